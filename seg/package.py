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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seg import labels as L
from seg.hu_refine import HURefinement
from seg.preprocess_config import PreprocessConfig

FORMAT = "dicomnode-model/1"
WEIGHTS_FILE = "model.safetensors"
STREAK_FILE = "streak.safetensors"  # the learned streak correction's weights (seg.streak_net)
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
    """What a package asks of inference (model.json "inference"). A request left at its default is
    not written, so model.json names only what the package asks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: the network's labels are final
    hu_refinement: HURefinement | None = Field(None, exclude_if=lambda v: v is None)
    # also run each window mirrored left-right and average the logits
    mirror_x: bool = Field(False, exclude_if=lambda v: not v)


class Architecture(BaseModel):
    """The network (model.json "architecture"): MONAI's UNETR and its keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "UNETR"  # another name is refused where the network is built or checked, by name
    library: str = "monai"
    # UNETR's keyword arguments as given: MONAI checks them when the network is built, and
    # :func:`check_shapes` against the weights without torch
    args: dict[str, Any]


class Weights(BaseModel):
    """The weights file (model.json "weights"): its name, checksum, and what it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = WEIGHTS_FILE
    sha256: str
    dtype: str  # of the floating-point tensors, e.g. "float16"
    tensors: dict[str, list[int]]  # name -> shape


class StreakCorrection(BaseModel):
    """The learned streak correction's weights (model.json "streak_correction"), which preprocessing
    "li+learned" applies after LI (:mod:`seg.streak_net`): its file and checksum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = STREAK_FILE
    sha256: str


class PackageMeta(BaseModel):
    """model.json: what the network is and expects, read once and checked when a package is read.

    Fields are in the order model.json has them (:func:`write_meta` keeps it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = FORMAT
    name: str
    version: str
    demo: bool = False
    statement: str = ""
    licence: str = ""
    architecture: Architecture
    roi_size: tuple[int, int, int]
    preprocessing: PreprocessConfig
    inference: InferenceOptions | None = Field(None, exclude_if=lambda v: v is None)
    classes: list[str]
    weights: Weights
    streak_correction: StreakCorrection | None = Field(None, exclude_if=lambda v: v is None)
    # How the package was made, free-form: training writes its run, data, validation and campaign
    # legs (seg.train.export, scripts/gpu_leg.py); a site may add its own (volume_tolerance_pct).
    # Nothing decides inference from it.
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def inference_options(self) -> InferenceOptions:
        return self.inference or InferenceOptions()

    @model_validator(mode="after")
    def _streak_correction_when_asked(self) -> PackageMeta:
        asked = self.preprocessing.metal_artefact_reduction == "li+learned"
        if asked != (self.streak_correction is not None):
            raise ValueError("preprocessing metal_artefact_reduction 'li+learned' and streak_correction "
                             "go together: the one asks for the correction, the other holds it")
        return self


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: Path) -> PackageMeta:
    """``path``'s model.json as read; refused with the file's name and every key that is missing,
    unknown or malformed."""
    mj = path / "model.json"
    if not path.is_dir():
        raise ModelPackageError(
            f"model package {path} is not a folder (expected model.json + {WEIGHTS_FILE})"
        )
    if not mj.is_file():
        raise ModelPackageError(f"model package {path} has no model.json")
    try:
        raw = json.loads(mj.read_text())
    except json.JSONDecodeError as e:
        raise ModelPackageError(f"{mj} is not valid JSON: {e}") from e
    try:
        return PackageMeta.model_validate(raw)
    except ValidationError as e:
        raise ModelPackageError(f"{mj}: {'; '.join(meta_problems(e))}") from e


def meta_problems(err: ValidationError) -> list[str]:
    """What is wrong with a model.json, one phrase per key: missing, unknown (with the keys known
    there) or invalid (named down to its part, e.g. 'inference.hu_refinement')."""
    out: list[str] = []
    unknown: dict[tuple[str, ...], list[str]] = {}
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        keys = tuple(p for p in e["loc"] if isinstance(p, str))  # without list positions
        if e["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(loc[-1])
        elif e["type"] == "missing" and keys == e["loc"]:
            out.append(f"the required key '{'.'.join(loc)}' is missing")
        else:  # a list too short is missing an item: the list is what is invalid
            out.append(f"'{'.'.join(keys[:2])}' is invalid: {e['msg']}")
    for where, keys in unknown.items():
        part = f" '{'.'.join(where)}'" if where else ""
        out.append(f"unknown{part} keys {sorted(keys)} (known: {_known_keys(where)})")
    return list(dict.fromkeys(out))


def _known_keys(where: tuple[str, ...]) -> list[str]:
    """The keys model.json may have at ``where`` (a path of record fields from the top)."""
    record: Any = PackageMeta
    for name in where:
        record = record.model_fields[name].annotation
        record = next((a for a in getattr(record, "__args__", ()) if isinstance(a, type)
                       and issubclass(a, BaseModel)), record)
    return list(record.model_fields)


def write_meta(path: Path, meta: PackageMeta) -> None:
    """Write ``path``/model.json: the one writer, so every package's model.json reads the same way."""
    (path / "model.json").write_text(json.dumps(meta.model_dump(mode="json"), indent=1) + "\n")


def verify_package(path: Path) -> PackageMeta:
    """``path``'s model.json, once the package is known to fit this node: its format, the 30 classes
    in our order, as many output channels, and weights whose sha256 is the one model.json states.
    What the network's tensors are is left to :func:`seg.model.load_model`."""
    p = Path(path)
    meta = read_meta(p)
    if meta.format != FORMAT:
        raise ModelPackageError(f"{p}: package format {meta.format!r}, this node reads {FORMAT!r}")
    classes = meta.classes
    if classes != list(L.CLASS_NAMES):
        diff = [f"{i}: package {a!r} vs node {b!r}"
                for i, (a, b) in enumerate(zip(classes, L.CLASS_NAMES, strict=False)) if a != b]
        raise ModelPackageError(
            f"class list of {p} does not match this node's {len(L.CLASS_NAMES)} classes "
            f"(seg/structures.csv): {len(classes)} classes in the package; first differences: "
            f"{diff[:3] or 'none, but the counts differ'}")
    arch = meta.architecture
    if int(arch.args.get("out_channels", -1)) != len(classes):
        raise ModelPackageError(f"{p}: out_channels {arch.args.get('out_channels')} != "
                                f"{len(classes)} classes")
    wpath = p / meta.weights.file
    if not wpath.is_file():
        raise ModelPackageError(f"{p}: weights file {wpath.name} is missing")
    check_weights_size(wpath)  # before hashing: an absurd file is refused at once
    check_shapes(p, arch, weights_header(wpath))
    _check_sha256(wpath, meta.weights.sha256)
    if meta.streak_correction is not None:
        spath = p / meta.streak_correction.file
        if not spath.is_file():
            raise ModelPackageError(f"{p}: streak correction file {spath.name} is missing")
        check_weights_size(spath)
        _check_sha256(spath, meta.streak_correction.sha256)
    return meta


def _check_sha256(path: Path, want: str) -> None:
    got = sha256_file(path)
    if want != got:
        raise ModelPackageError(f"{path} checksum mismatch (model.json sha256 {want}, file {got}): "
                                "the weights are corrupt or belong to another package")


def attach_streak_correction(path: Path, streak_file: Path) -> PackageMeta:
    """Give package ``path`` the learned streak correction in ``streak_file`` (copied in as
    :data:`STREAK_FILE`): its preprocessing then asks for "li+learned", after LI as before. The
    package's network must have been trained on LI-corrected CTs (preprocessing "li" or
    "li+learned"): the correction only takes away more of the streak LI leaves."""
    meta = verify_package(path)
    if meta.preprocessing.metal_artefact_reduction == "none":
        raise ModelPackageError(f"{path}: its network was trained without metal artefact reduction; "
                                "the streak correction follows LI")
    pre = meta.preprocessing.model_copy(update={"metal_artefact_reduction": "li+learned"})
    updated = PackageMeta.model_validate(meta.model_dump() | {
        "preprocessing": pre.model_dump(),
        "streak_correction": install_streak_file(path, streak_file).model_dump()})
    write_meta(path, updated)
    (path / STREAK_FILE).chmod((path / "model.json").stat().st_mode & 0o777)
    return updated


def install_streak_file(path: Path, streak_file: Path) -> StreakCorrection:
    """``streak_file`` copied into package folder ``path`` as :data:`STREAK_FILE`; its entry for
    model.json. The caller makes it as readable as model.json (:func:`write_meta` writes that)."""
    import shutil

    target = path / STREAK_FILE
    if streak_file.resolve() != target.resolve():
        shutil.copyfile(streak_file, target)
    return StreakCorrection(sha256=sha256_file(target))


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


def check_shapes(p: Path, arch: Architecture, tensors: dict[str, dict]) -> None:
    """Refuse a model.json whose UNETR arguments do not fit its weights' input and output layers (an
    edited model.json, or the weights of another run): found here without torch, not by the worker.
    Tensors that are absent (another patch embedding) are left to :func:`seg.model.load_model`."""
    if arch.name != "UNETR":
        return
    bad = []
    for (tensor, dim), (name, size) in declared_shapes(arch.args).items():
        shape = tensors.get(tensor, {}).get("shape", [])
        if dim < len(shape) and shape[dim] != size:
            bad.append(f"{name} {size}, but {tensor} has {shape[dim]}")
    if bad:
        raise ModelPackageError(f"{p}: tensor shapes do not fit model.json: {'; '.join(bad[:3])}. "
                                "Use the model.json exported with these weights")
