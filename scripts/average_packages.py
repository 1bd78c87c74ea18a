"""Write a model package whose weights are the tensor-wise mean of other packages' weights.

    python scripts/average_packages.py --out checkpoints/mean/pkg --version 0.9.3 \\
        seg/models/demo checkpoints/leg24/pkg

The packages must be one network reading the same input (architecture, classes, preprocessing and
inference options alike); the new model.json is the last package's, with the new version, a note
and ``averaged_from``. Evaluate the result like any leg's package before shipping it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("packages", nargs="+", type=Path, help="two or more package folders")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the new package to")
    ap.add_argument("--version", required=True, help="version of the new package, e.g. 0.9.3")
    args = ap.parse_args(argv)
    from seg.average import average_packages
    from seg.package import ModelPackageError

    try:
        out = average_packages(args.packages, args.out, version=args.version)
    except (ModelPackageError, ValueError) as e:  # unlike packages; fewer than two
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged package written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
