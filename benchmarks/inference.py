"""Inference benchmark: one whole-thigh phantom through a UNETR on CPU, per runtime.

Default: the paper-size UNETR (patch 16, hidden 768, 12 heads, MLP 3072, feature 16; random weights,
timing only) at 1.5 mm. ``--model PATH`` (or ``--model demo``) times a real package instead. Each
runtime runs in its own subprocess so peak RSS is that runtime's alone; argmax agreement is measured
against fp32 on the CT grid. ONNX Runtime is timed only if it is installed (it is not a dependency).

    .venv/bin/python benchmarks/inference.py --runtimes fp32,bf16 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _make_paper_package(path: Path, spacing: float) -> Path:
    import torch

    from seg.model import PAPER_UNETR, build_network, save_package
    from seg.preprocess import PreprocessConfig

    if (path / "model.json").exists():
        return path
    torch.manual_seed(0)
    arch = dict(PAPER_UNETR)
    net = build_network({"name": "UNETR", "args": arch})
    return save_package(
        path,
        net,
        name="paper-unetr-random",
        version="bench",
        arch_args=arch,
        preprocess=PreprocessConfig(spacing_mm=(spacing,) * 3),
        roi_size=tuple(arch["img_size"]),
        demo=True,
        provenance={"note": "random weights, for timing only"},
        dtype=torch.float32,
    )


def _phantom(args) -> tuple:
    from seg.phantom import PhantomOptions, make_phantom

    ph = make_phantom(PhantomOptions(seed=args.seed, spacing_mm=(args.ct_spacing,) * 2 + (args.ct_slice,)))
    return ph.ct, ph.labels


def _onnx_predictor(pkg, roi):
    """Export the network to ONNX and return a callable with the network's signature."""
    import onnxruntime as ort
    import torch

    path = Path(args_global.work) / "model.onnx"
    if not path.exists():
        torch.onnx.export(
            pkg.network,
            torch.zeros(1, 1, *roi),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
            opset_version=17,
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = args_global.threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    class _Net(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(sess.run(None, {"x": x.float().numpy()})[0])

    return _Net()


def run_one(args) -> None:
    """Child process: time one runtime, save its labels."""
    import torch

    from seg.infer import segment
    from seg.model import load_model

    torch.set_num_threads(args.threads)
    ct, _ = _phantom(args)
    pkg = load_model(None if args.model == "demo" else args.model, device="cpu")
    precision = "bf16" if args.runtime == "bf16" else "fp32"
    if args.runtime == "onnx":
        pkg.network = _onnx_predictor(pkg, pkg.roi_size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    lab = segment(ct, pkg, precision=precision)
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(Path(args.work) / f"labels_{args.runtime}.npy", lab.array)
    print(
        json.dumps(
            {
                "runtime": args.runtime,
                "seconds": round(dt, 2),
                "peak_rss_mb": round(rss, 1),
                "rss_before_mb": round(rss0, 1),
                "ct_shape": list(ct.shape),
                "ct_spacing_mm": list(ct.spacing_mm),
                "model": pkg.info["name"],
                "model_spacing_mm": pkg.info["spacing_mm"],
                "roi": list(pkg.roi_size),
            }
        ),
        flush=True,
    )


args_global = None


def main() -> None:
    global args_global
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="package folder or 'demo' (default: paper-size random UNETR)"
    )
    ap.add_argument("--spacing", type=float, default=1.5, help="model spacing of the paper-size package (mm)")
    ap.add_argument("--ct-spacing", type=float, default=1.5, help="phantom in-plane spacing (mm)")
    ap.add_argument("--ct-slice", type=float, default=1.5, help="phantom slice spacing (mm)")
    ap.add_argument("--seed", type=int, default=424242)
    ap.add_argument("--runtimes", default="fp32,bf16,onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per runtime before giving up")
    ap.add_argument("--work", default="/tmp/bench-inference")
    ap.add_argument("--out", default=None, help="write results.json here")
    ap.add_argument("--runtime", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args_global = args
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.runtime:
        run_one(args)
        return
    if args.model is None:
        args.model = str(_make_paper_package(work / f"paper_unetr_{args.spacing:g}mm", args.spacing))
    runtimes = [r for r in args.runtimes.split(",") if r]
    if "onnx" in runtimes:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("onnxruntime not installed: skipping the ONNX runtime", file=sys.stderr)
            runtimes.remove("onnx")
    results = []
    for rt in runtimes:
        cmd = [
            sys.executable,
            __file__,
            "--runtime",
            rt,
            "--model",
            args.model,
            "--ct-spacing",
            str(args.ct_spacing),
            "--ct-slice",
            str(args.ct_slice),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--work",
            str(work),
        ]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"runtime": rt, "seconds": None, "note": f"stopped after {args.timeout} s"})
            print(json.dumps(results[-1]), flush=True)
            continue
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode or not line:
            print(f"{rt} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[-1]))
        print(line[-1], flush=True)
    ref = work / "labels_fp32.npy"
    if ref.exists():
        a = np.load(ref)
        for r in results:
            if r.get("seconds") is None:
                continue
            b = np.load(work / f"labels_{r['runtime']}.npy")
            r["argmax_agreement_vs_fp32"] = float((a == b).mean())
            fg = (a > 0) | (b > 0)
            r["agreement_in_labelled_voxels"] = float((a[fg] == b[fg]).mean()) if fg.any() else 1.0
    import os
    import platform

    summary = {
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible",
        "threads": args.threads,
        "results": results,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
