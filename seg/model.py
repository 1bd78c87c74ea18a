"""Model packages: a folder with ``model.json`` (what the network is and expects) and safetensors weights.

Loading checks everything a site could get wrong — class list, architecture, tensor shapes and the
weights' sha256 — and fails with a message that says what to fix, instead of producing a wrong map.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seg import labels as L
from seg.package import (
    DEMO_DIR,
    DEMO_STATEMENT,
    FORMAT,
    STREAK_FILE,
    WEIGHTS_FILE,
    Architecture,
    InferenceOptions,
    ModelPackageError,
    PackageMeta,
    Weights,
    install_streak_file,
    sha256_file,
    verify_package,
    write_meta,
)
from seg.preprocess_config import PreprocessConfig
from seg.records import ModelInfo

log = logging.getLogger(__name__)

@dataclass
class ModelPackage:
    """A loaded, verified model ready for :func:`seg.infer.segment`."""

    path: Path | None
    meta: PackageMeta
    network: torch.nn.Module
    device: torch.device
    # the learned streak correction (preprocessing "li+learned", seg.streak_net); on the CPU
    streak_net: torch.nn.Module | None = None

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return self.meta.roi_size

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.meta.preprocessing

    @property
    def inference(self) -> InferenceOptions:
        return self.meta.inference_options

    @property
    def info(self) -> ModelInfo:
        """What outputs record about the model (volumes.json, SEG, SR)."""
        m = self.meta
        return ModelInfo(
            name=m.name,
            version=m.version,
            demo=m.demo,
            spacing_mm=m.preprocessing.spacing_mm,
            architecture=m.architecture.name,
            statement=m.statement,
            licence=m.licence,
            metal_artefact_reduction=m.preprocessing.metal_artefact_reduction,
        )


def build_network(arch: Architecture) -> torch.nn.Module:
    """The network described by model.json's "architecture" (MONAI UNETR)."""
    if arch.name != "UNETR":
        raise ModelPackageError(
            f"unsupported architecture {arch.name!r}; this node runs MONAI UNETR packages")
    from monai.networks.nets import UNETR

    args = dict(arch.args)
    args["img_size"] = tuple(args["img_size"])
    try:
        return UNETR(**args)
    except (TypeError, ValueError, AssertionError) as e:
        raise ModelPackageError(f"architecture arguments rejected by MONAI UNETR: {e}") from e


def save_package(
    out_dir: Path | str,
    network: torch.nn.Module,
    *,
    name: str,
    version: str,
    arch_args: dict,
    preprocess: PreprocessConfig,
    roi_size: tuple[int, int, int],
    demo: bool,
    provenance: dict,
    licence: str = "Apache-2.0",
    statement: str | None = None,
    dtype: torch.dtype = torch.float16,
    inference: InferenceOptions | None = None,
    streak_file: Path | None = None,
) -> Path:
    """Write a package folder: model.safetensors (weights, ``dtype``) and model.json.

    ``inference`` holds what the model itself asks of inference, e.g. ``mirror_x`` for a model
    trained on left-right mirrored crops (:func:`seg.infer.predict_probabilities`) and
    ``hu_refinement`` for the HU refinement of its label edges (:mod:`seg.hu_refine`).
    ``streak_file``: the learned streak correction's weights, for a ``preprocess`` that asks for
    "li+learned" (:mod:`seg.streak_net`).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in network.state_dict().items()
    }
    wpath = out / WEIGHTS_FILE
    save_file(state, str(wpath), metadata={"format": FORMAT})
    meta = PackageMeta(
        name=name,
        version=version,
        demo=demo,
        statement=statement if statement is not None else (DEMO_STATEMENT if demo else ""),
        licence=licence,
        architecture=Architecture(args=arch_args),
        roi_size=roi_size,
        preprocessing=preprocess,
        inference=inference,
        classes=list(L.CLASS_NAMES),
        weights=Weights(
            sha256=sha256_file(wpath),
            dtype=str(dtype).split(".")[-1],
            tensors={k: list(v.shape) for k, v in state.items()},
        ),
        streak_correction=install_streak_file(out, streak_file) if streak_file is not None else None,
        provenance={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **provenance},
    )
    write_meta(out, meta)
    # safetensors writes its file 0600: a node running as another user could not read the package
    for written in (wpath, *([out / STREAK_FILE] if streak_file is not None else [])):
        written.chmod((out / "model.json").stat().st_mode & 0o777)
    return out


def in_memory_package(network: torch.nn.Module, arch_args: dict, preprocess: PreprocessConfig,
                      device: torch.device) -> ModelPackage:
    """A network with no package folder (the benchmarks' random paper-size UNETR), described as
    :func:`save_package` would describe it, less a checksum (so no runtime caches it by one)."""
    meta = PackageMeta(name="in-memory", version="0", architecture=Architecture(args=arch_args),
                       roi_size=tuple(arch_args["img_size"]), preprocessing=preprocess,
                       classes=list(L.CLASS_NAMES), weights=Weights(sha256="", dtype="float32", tensors={}))
    return ModelPackage(path=None, meta=meta, network=network, device=device)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: Path | str | None = None, device: str = "auto") -> ModelPackage:
    """Load and verify a model package (None = the shipped demo model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path) if path is not None else DEMO_DIR
    meta = verify_package(p)
    wpath = p / meta.weights.file
    arch = meta.architecture
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelPackageError(f"{wpath} is not a readable safetensors file: {e}") from e
    net = build_network(arch)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ModelPackageError(
            f"{wpath}: weights do not fit the architecture in model.json "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise ModelPackageError(f"{wpath}: tensor shapes do not fit the architecture: {bad[:3]}")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    dev = resolve_device(device)
    net.to(dev).eval()
    if meta.roi_size != tuple(int(v) for v in arch.args["img_size"]):
        raise ModelPackageError(
            f"{p}: roi_size {list(meta.roi_size)} != UNETR img_size {arch.args['img_size']}")
    return ModelPackage(path=p, meta=meta, network=net, device=dev, streak_net=_streak_net(p, meta))


def _streak_net(p: Path, meta: PackageMeta) -> torch.nn.Module | None:
    """The package's learned streak correction, when it has one (verified by :func:`verify_package`)."""
    if meta.streak_correction is None:
        return None
    from seg.streak_net import load_streak_net

    spath = p / meta.streak_correction.file
    try:
        return load_streak_net(str(spath))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelPackageError(f"{spath}: not the streak correction's weights: {e}") from e
