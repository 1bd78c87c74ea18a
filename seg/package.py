"""The model package as files: ``model.json`` (what the network is and expects) and its weights.

Why apart from :mod:`seg.model`: checking a package (its metadata, class list and the weights'
sha256) needs no torch, so ``dicomnode config check`` and the node's start verify the configured
package without loading the network; :func:`seg.model.load_model` verifies through here too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from seg import labels as L
from seg.hu_refine import HURefinement

FORMAT = "dicomnode-model/1"
WEIGHTS_FILE = "model.safetensors"
DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"
DEMO_STATEMENT = "phantom-trained demonstration model, not for clinical measurement"


class ModelPackageError(RuntimeError):
    """The model package cannot be used (missing, corrupt or not matching this node)."""


class InferenceOptions(BaseModel):
    """What a package asks of inference (model.json "inference"), parsed once when it is read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mirror_x: bool = False  # also run each window mirrored left-right and average the logits
    hu_refinement: HURefinement | None = None  # None: the network's labels are final


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: Path) -> dict:
    mj = path / "model.json"
    if not path.is_dir():
        raise ModelPackageError(
            f"model package {path} is not a folder (expected model.json + {WEIGHTS_FILE})"
        )
    if not mj.is_file():
        raise ModelPackageError(f"model package {path} has no model.json")
    try:
        meta = json.loads(mj.read_text())
    except json.JSONDecodeError as e:
        raise ModelPackageError(f"{mj} is not valid JSON: {e}") from e
    for key in ("name", "version", "architecture", "roi_size", "preprocessing", "classes", "weights"):
        if key not in meta:
            raise ModelPackageError(f"{mj} lacks the required key {key!r}")
    inference_options(mj, meta.get("inference", {}))
    return meta


INFERENCE_KEYS = ("mirror_x", "hu_refinement")


def inference_options(mj: Path, inference: object) -> InferenceOptions:
    """The package's inference options, refused with its file's name when misspelt or malformed."""
    if not isinstance(inference, dict):
        raise ModelPackageError(f"{mj}: 'inference' must be an object, not {type(inference).__name__}")
    unknown = sorted(set(inference) - set(INFERENCE_KEYS))
    if unknown:
        raise ModelPackageError(f"{mj}: unknown 'inference' keys {unknown} (known: {list(INFERENCE_KEYS)})")
    try:
        raw = inference.get("hu_refinement")
        rule = None if raw is None else HURefinement.model_validate(raw)
    except ValidationError as e:
        raise ModelPackageError(f"{mj}: 'inference.hu_refinement' is invalid: {e}") from e
    try:
        return InferenceOptions(mirror_x=inference.get("mirror_x", False), hu_refinement=rule)
    except ValidationError as e:
        raise ModelPackageError(f"{mj}: 'inference.mirror_x' is invalid: {e}") from e


def verify_package(path: Path) -> dict:
    """``path``'s model.json, once the package is known to fit this node: its format, the 30 classes
    in our order, as many output channels, and weights whose sha256 is the one model.json states.
    What the network's tensors are is left to :func:`seg.model.load_model`."""
    p = Path(path)
    meta = read_meta(p)
    if meta.get("format", FORMAT) != FORMAT:
        raise ModelPackageError(f"{p}: package format {meta.get('format')!r}, this node reads {FORMAT!r}")
    classes = list(meta["classes"])
    if classes != list(L.CLASS_NAMES):
        diff = [f"{i}: package {a!r} vs node {b!r}"
                for i, (a, b) in enumerate(zip(classes, L.CLASS_NAMES, strict=False)) if a != b]
        raise ModelPackageError(
            f"class list of {p} does not match this node's {len(L.CLASS_NAMES)} classes "
            f"(seg/structures.csv): {len(classes)} classes in the package; first differences: "
            f"{diff[:3] or 'none, but the counts differ'}")
    arch = meta["architecture"]
    if int(arch["args"].get("out_channels", -1)) != len(classes):
        raise ModelPackageError(f"{p}: out_channels {arch['args'].get('out_channels')} != "
                                f"{len(classes)} classes")
    wpath = p / meta["weights"].get("file", WEIGHTS_FILE)
    if not wpath.is_file():
        raise ModelPackageError(f"{p}: weights file {wpath.name} is missing")
    want, got = meta["weights"].get("sha256"), sha256_file(wpath)
    if want != got:
        raise ModelPackageError(f"{wpath} checksum mismatch (model.json sha256 {want}, file {got}): "
                                "the weights are corrupt or belong to another package")
    return meta
