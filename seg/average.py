"""The tensor-wise mean of several model packages' weights, written as one package.

Legs of the campaign that start from the same package and train in different directions (another
loss, other phantoms) often average to a network better than either (0.9.1 was such a mean). The
mean only makes sense between networks that read the same input and name the same classes, so
packages that differ in architecture, classes, preprocessing or inference options are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from seg.model import ModelPackage, load_model, save_package
from seg.package import ModelPackageError


def _refuse_unlike(packages: Sequence[ModelPackage], paths: Sequence[Path]) -> None:
    """Raise unless every package reads and labels as the first one does."""
    first = packages[0].meta
    for path, pkg in zip(paths[1:], packages[1:], strict=True):
        meta = pkg.meta
        for what, a, b in (
            ("architecture", first.architecture, meta.architecture),
            ("classes", first.classes, meta.classes),
            ("preprocessing", first.preprocessing, meta.preprocessing),
            ("inference options", first.inference_options, meta.inference_options),
            ("ROI", first.roi_size, meta.roi_size),
            ("streak correction", first.streak_correction, meta.streak_correction),
        ):
            if a != b:
                raise ModelPackageError(
                    f"{path}: its {what} differ from {paths[0]}'s; only packages of one "
                    "network reading the same input can be averaged"
                )


def mean_state(packages: Sequence[ModelPackage]) -> dict[str, torch.Tensor]:
    """The fp32 mean of the packages' tensors, key by key."""
    states = [p.network.state_dict() for p in packages]
    return {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}


def average_packages(parts: Sequence[Path | str], out: Path | str, *, version: str) -> Path:
    """Write the package at ``out`` whose weights are the mean of ``parts``' weights (fp16).

    The new ``model.json`` is the last part's (its provenance, validation and campaign legs) with
    ``version``, a note naming the parts and ``averaged_from`` (path, version, weights' sha256)."""
    if len(parts) < 2:
        raise ValueError("averaging needs at least two packages")
    paths = [Path(p) for p in parts]
    packages = [load_model(p, device="cpu") for p in paths]
    _refuse_unlike(packages, paths)
    last = packages[-1]
    network = last.network
    network.load_state_dict(mean_state(packages))
    meta = last.meta
    provenance = {k: v for k, v in meta.provenance.items() if k != "created"}
    provenance["note"] = f"{version}: tensor-wise mean of the weights of " + ", ".join(
        f"{p} ({pkg.meta.version})" for p, pkg in zip(paths, packages, strict=True)
    )
    provenance["averaged_from"] = [
        {"path": str(p), "version": pkg.meta.version, "sha256": pkg.meta.weights.sha256}
        for p, pkg in zip(paths, packages, strict=True)
    ]
    streak = meta.streak_correction  # the same in every part (refused otherwise): carried over
    return save_package(
        out, network, name=meta.name, version=version, arch_args=dict(meta.architecture.args),
        preprocess=meta.preprocessing, roi_size=meta.roi_size, demo=meta.demo,
        provenance=provenance, statement=meta.statement, licence=meta.licence,
        inference=meta.inference, streak_file=paths[-1] / streak.file if streak is not None else None,
    )
