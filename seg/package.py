"""The model package as files: ``model.json`` (what the network is and expects) and its weights.

Why apart from :mod:`seg.model`: checking a package (its metadata, class list, the weights' size,
their safetensors header against model.json, their sha256) needs no torch, so ``dicomnode config
check`` and the node's start verify the configured package without loading the network;
:func:`seg.model.load_model` verifies through here too.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from seg import labels as L
from seg.hu_refine import HURefinement

FORMAT = "dicomnode-model/1"
WEIGHTS_FILE = "model.safetensors"
DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"
DEMO_STATEMENT = "phantom-trained demonstration model, not for clinical measurement"
# the paper's UNETR (92 M parameters) is 0.2 GiB in float16, 0.4 GiB in float32: a weights file over
# this is another model, or not weights at all, and would only be found when the worker runs out of memory
MAX_WEIGHTS_BYTES = 2 * 1024**3
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit for its JSON header
UNETR_PATCH = 16  # MONAI's UNETR cuts the image into 16^3-voxel patches


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
    check_weights_size(wpath)  # before hashing: an absurd file is refused at once
    check_shapes(p, arch, weights_header(wpath))
    want, got = meta["weights"].get("sha256"), sha256_file(wpath)
    if want != got:
        raise ModelPackageError(f"{wpath} checksum mismatch (model.json sha256 {want}, file {got}): "
                                "the weights are corrupt or belong to another package")
    return meta


def check_weights_size(wpath: Path) -> None:
    """Refuse a weights file no model of this node can be (:data:`MAX_WEIGHTS_BYTES`)."""
    size = wpath.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ModelPackageError(
            f"{wpath} is {size / 1024**3:.1f} GiB, over the {MAX_WEIGHTS_BYTES / 1024**3:.0f} GiB a model "
            "package may hold (the paper's UNETR: 0.2-0.4 GiB): the wrong file, or not this node's model")


def weights_header(wpath: Path) -> dict[str, dict]:
    """The safetensors header, read without torch: tensor name -> {dtype, shape, data_offsets}.

    Refused when the file is not safetensors or is cut short: the header (JSON after its 8-byte
    little-endian length) must describe every byte of the rest of the file."""
    size = wpath.stat().st_size
    with wpath.open("rb") as fh:
        prefix = fh.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ModelPackageError(f"{wpath} is not a readable safetensors file (no valid header)")
        try:
            header = json.loads(fh.read(length))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            for v in tensors.values():
                v["shape"] = [int(d) for d in v["shape"]]
        except (ValueError, AttributeError, KeyError, TypeError, IndexError) as e:
            raise ModelPackageError(f"{wpath} is not a readable safetensors file (header: {e})") from e
    if 8 + length + end != size:
        raise ModelPackageError(f"{wpath} is not a readable safetensors file: its tensors end at byte "
                                f"{8 + length + end}, the file at {size} (cut short or padded)")
    return tensors


def declared_shapes(args: dict) -> dict[tuple[str, int], tuple[str, int]]:
    """What a MONAI UNETR's arguments say its input and output layers are, as (tensor, dimension) ->
    (argument, size): the few tensors whose shapes follow from model.json without building the net."""
    patch_in = "vit.patch_embedding.patch_embeddings.weight"  # [hidden, in_channels, 16, 16, 16]
    head = "out.conv.conv.weight"  # [out_channels, feature_size, 1, 1, 1]
    shapes = {(head, 0): ("out_channels", args.get("out_channels")),
              (head, 1): ("feature_size", args.get("feature_size")),
              (patch_in, 0): ("hidden_size", args.get("hidden_size")),
              (patch_in, 1): ("in_channels", args.get("in_channels"))}
    img = args.get("img_size")
    if isinstance(img, list) and all(isinstance(v, int) for v in img):
        patches = math.prod(v // UNETR_PATCH for v in img)
        shapes[("vit.patch_embedding.position_embeddings", 1)] = (f"img_size {img}: patches", patches)
    return {k: (name, int(v)) for k, (name, v) in shapes.items() if isinstance(v, int)}


def check_shapes(p: Path, arch: dict, tensors: dict[str, dict]) -> None:
    """Refuse a model.json whose UNETR arguments do not fit its weights' input and output layers (an
    edited model.json, or the weights of another run): found here without torch, not by the worker.
    Tensors that are absent (another patch embedding) are left to :func:`seg.model.load_model`."""
    if arch.get("name") != "UNETR":
        return
    bad = []
    for (tensor, dim), (name, size) in declared_shapes(arch.get("args", {})).items():
        shape = tensors.get(tensor, {}).get("shape", [])
        if dim < len(shape) and shape[dim] != size:
            bad.append(f"{name} {size}, but {tensor} has {shape[dim]}")
    if bad:
        raise ModelPackageError(f"{p}: tensor shapes do not fit model.json: {'; '.join(bad[:3])}. "
                                "Use the model.json exported with these weights")
