"""Sub-commands: ``segment`` (CT → labels + volumes), ``train`` (UNETR → model package), ``evaluate``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def _triplet(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise typer.BadParameter("give one number or three, e.g. 3 or 3,3,3")
    return parts[0], parts[1], parts[2]


def segment(
    input: Annotated[Path, typer.Argument(help="DICOM series folder or NIfTI CT.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (labels.nii.gz, volumes.json, volumes.csv).")
    ],
    model: Annotated[
        Path | None, typer.Option("--model", help="Model package folder (default: demo).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Segment the 30 structures of a thigh CT and measure their volumes."""
    import time

    from seg.infer import segment as run_segment
    from seg.io import load_image, save_nifti
    from seg.measure import measure_volumes, write_volumes
    from seg.model import ModelPackageError, load_model

    console = Console(stderr=True)
    try:
        pkg = load_model(model, device=device)
    except ModelPackageError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from e
    if pkg.info.get("demo"):
        console.print(f"[yellow]model {pkg.info['name']} {pkg.info['version']}: {pkg.info['statement']}[/]")
    ct = load_image(input)
    t = time.perf_counter()
    labels = run_segment(ct, pkg, progress=progress)
    dt = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    save_nifti(labels, out / "labels.nii.gz")
    rec = measure_volumes(labels, ct, model=pkg.info)  # height: a plausible PatientSize, else none
    write_volumes(rec, out)
    console.print(f"segmented {ct.shape} in {dt:.1f} s -> {out}")


def train(
    out: Annotated[Path, typer.Option("--out", help="Model package folder to write.")],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Dataset folder: one folder per case with ct.nii.gz or dicom/ and labels.nii.gz."
        ),
    ] = None,
    phantoms: Annotated[int, typer.Option("--phantoms", help="Train on N synthetic phantoms.")] = 0,
    seed_start: Annotated[int, typer.Option("--seed-start", help="First phantom seed.")] = 1000,
    val_phantoms: Annotated[int, typer.Option(help="Extra phantoms (next seeds) for validation.")] = 1,
    checkpoints: Annotated[Path, typer.Option("--checkpoints", help="Checkpoint + cache folder.")] = Path(
        "checkpoints/run"
    ),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <checkpoints>/last.pt.")] = False,
    init_from: Annotated[
        Path | None,
        typer.Option("--init-from", help="Start from this package's weights (same architecture and spacing), "
                     "e.g. seg/models/demo to continue the shipped demo model without its checkpoints."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this wall time.")] = None,
    batch_size: Annotated[int, typer.Option(help="Crops per step.")] = 2,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-4,
    spacing: Annotated[str, typer.Option(help="Model grid spacing mm (one or three numbers).")] = "3",
    roi: Annotated[int, typer.Option(help="Cubic ROI edge (voxels, multiple of 16).")] = 64,
    hidden_size: Annotated[int, typer.Option(help="UNETR hidden size (paper: 768).")] = 192,
    num_heads: Annotated[int, typer.Option(help="Attention heads (paper: 12).")] = 4,
    mlp_dim: Annotated[int, typer.Option(help="Transformer MLP size (paper: 3072).")] = 768,
    feature_size: Annotated[int, typer.Option(help="Decoder feature size (paper: 16).")] = 8,
    val_every: Annotated[int, typer.Option(help="Validate every N steps.")] = 100,
    z_range: Annotated[
        str | None, typer.Option(help="Phantom z range mm 'lo,hi' (small test phantoms).")
    ] = None,
    name: Annotated[str, typer.Option(help="Model name in the package.")] = "thigh-unetr-site",
    version: Annotated[str, typer.Option(help="Model version.")] = "0.1.0",
    demo: Annotated[
        bool, typer.Option("--demo", help="Mark as a phantom-trained demonstration model.")
    ] = False,
    dice_batch: Annotated[bool, typer.Option(help="Dice over the whole batch (not per crop).")] = True,
    decay_start: Annotated[float, typer.Option(help="Fraction of the run after which the LR decays.")] = 0.7,
    crop: Annotated[
        str, typer.Option(help="Crop centres: 'foreground' (any labelled voxel) or 'classes' (a structure "
                          "drawn uniformly, then one of its voxels).")
    ] = "foreground",
    targets: Annotated[
        str, typer.Option(help="Training targets: 'partial_volume' (class fractions of each model voxel) "
                          "or 'nearest' (one label per voxel).")
    ] = "partial_volume",
    warmup_steps: Annotated[int, typer.Option(help="Linear LR warm-up steps.")] = 20,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.")] = 2,
    seed: Annotated[int, typer.Option(help="Training RNG seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a MONAI UNETR (paper preprocessing, DiceCE) and write a model package."""
    from seg.train import TrainConfig
    from seg.train import train as run_train

    if data is None and phantoms <= 0:
        raise typer.BadParameter("give --data DIR or --phantoms N")
    if crop not in ("foreground", "classes"):
        raise typer.BadParameter("--crop must be 'foreground' or 'classes'")
    if targets not in ("partial_volume", "nearest"):
        raise typer.BadParameter("--targets must be 'partial_volume' or 'nearest'")
    if roi % 16:
        raise typer.BadParameter("--roi must be a multiple of the patch size 16")
    zr = None
    if z_range:
        lo, hi = (float(v) for v in z_range.split(","))
        zr = (lo, hi)
    arch = {
        "in_channels": 1,
        "out_channels": 30,
        "img_size": [roi] * 3,
        "feature_size": feature_size,
        "hidden_size": hidden_size,
        "mlp_dim": mlp_dim,
        "num_heads": num_heads,
        "proj_type": "conv",
        "norm_name": "instance",
        "res_block": True,
        "dropout_rate": 0.0,
    }
    cfg = TrainConfig(
        out=str(out),
        checkpoint_dir=str(checkpoints),
        data=str(data) if data else None,
        phantoms=phantoms,
        seed_start=seed_start,
        val_phantoms=val_phantoms if data is None else 0,
        phantom_z_range_mm=zr,
        arch=arch,
        spacing_mm=_triplet(spacing),
        batch_size=batch_size,
        steps=steps,
        max_minutes=max_minutes,
        lr=lr,
        val_every=val_every,
        threads=threads,
        dice_batch=dice_batch,
        decay_start=decay_start,
        crop=crop,
        targets=targets,
        warmup_steps=warmup_steps,
        name=name,
        version=version,
        demo=demo,
        seed=seed,
        device=device,
        init_from=str(init_from) if init_from else None,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = run_train(cfg, resume=resume, progress=progress)
    Console(stderr=True).print(f"model package written to {path}")


def evaluate(
    model: Annotated[Path | None, typer.Option("--model", help="Model package (default: demo).")] = None,
    phantoms: Annotated[int, typer.Option("--phantoms", help="Evaluate on N held-out phantoms.")] = 0,
    seed_start: Annotated[int, typer.Option("--seed-start", help="First held-out phantom seed.")] = 5000,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset folder (as for train).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write evaluation.json and evaluation.csv here.")
    ] = None,
    z_range: Annotated[str | None, typer.Option(help="Phantom z range mm 'lo,hi' (small phantoms).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Per-class Dice, HD95 and volume error of a model on held-out labelled CTs."""
    from seg.evaluate import evaluate_model, format_table, write_evaluation
    from seg.model import ModelPackageError, load_model

    if data is None and phantoms <= 0:
        raise typer.BadParameter("give --data DIR or --phantoms N")
    try:
        pkg = load_model(model, device=device)
    except ModelPackageError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from e
    zr = tuple(float(v) for v in z_range.split(",")) if z_range else None
    result = evaluate_model(pkg, phantoms=phantoms, seed_start=seed_start, data=data, z_range_mm=zr)
    Console().print(format_table(result))
    if out is not None:
        write_evaluation(result, out)
        Console(stderr=True).print(f"written {out / 'evaluation.json'}")
    else:
        print(json.dumps({"mean_dice_muscles": result["mean_dice_muscles"]}))


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""
    app.command("segment")(segment)
    app.command("train")(train)
    app.command("evaluate")(evaluate)
