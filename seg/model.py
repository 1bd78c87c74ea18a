"""Model packages: a folder with ``model.json`` (what the network is and expects) and safetensors weights.

Loading checks everything a site could get wrong — class list, architecture, tensor shapes and the
weights' sha256 — and fails with a message that says what to fix, instead of producing a wrong map.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seg import labels as L
from seg.package import (  # noqa: F401  (the package format's names, for the importers of seg.model)
    DEMO_DIR,
    DEMO_STATEMENT,
    FORMAT,
    WEIGHTS_FILE,
    InferenceOptions,
    ModelPackageError,
    inference_options,
    read_meta,
    sha256_file,
    verify_package,
)
from seg.preprocess import PreprocessConfig
from seg.records import ModelInfo

log = logging.getLogger(__name__)

@dataclass
class ModelPackage:
    """A loaded, verified model ready for :func:`seg.infer.segment`."""

    path: Path | None
    meta: dict
    network: torch.nn.Module
    device: torch.device
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceOptions = field(default_factory=InferenceOptions)

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["roi_size"])  # type: ignore[return-value]

    @property
    def info(self) -> ModelInfo:
        """What outputs record about the model (volumes.json, SEG, SR)."""
        m = self.meta
        return ModelInfo(
            name=m["name"],
            version=m["version"],
            demo=bool(m.get("demo", False)),
            spacing_mm=tuple(m["preprocessing"]["spacing_mm"]),
            architecture=m["architecture"]["name"],
            statement=m.get("statement", ""),
            licence=m.get("licence", ""),
        )


def build_network(arch: dict) -> torch.nn.Module:
    """The network described by model.json's "architecture" (MONAI UNETR)."""
    name = arch.get("name", "UNETR")
    if name != "UNETR":
        raise ModelPackageError(f"unsupported architecture {name!r}; this node runs MONAI UNETR packages")
    from monai.networks.nets import UNETR

    args = dict(arch["args"])
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
    inference: dict | None = None,
) -> Path:
    """Write a package folder: model.safetensors (weights, ``dtype``) and model.json.

    ``inference`` holds what the model itself asks of inference, e.g. ``{"mirror_x": True}`` for a
    model trained on left-right mirrored crops (:func:`seg.infer.predict_probabilities`) and
    ``{"hu_refinement": {...}}`` for the HU refinement of its label edges (:mod:`seg.hu_refine`).
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
    meta = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "demo": demo,
        "statement": statement if statement is not None else (DEMO_STATEMENT if demo else ""),
        "licence": licence,
        "architecture": {"name": "UNETR", "library": "monai", "args": arch_args},
        "roi_size": list(roi_size),
        "preprocessing": preprocess.to_dict(),
        **({"inference": dict(inference)} if inference else {}),
        "classes": list(L.CLASS_NAMES),
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": sha256_file(wpath),
            "dtype": str(dtype).split(".")[-1],
            "tensors": {k: list(v.shape) for k, v in state.items()},
        },
        "provenance": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **provenance},
    }
    (out / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    # safetensors writes its file 0600: a node running as another user could not read the package
    wpath.chmod((out / "model.json").stat().st_mode & 0o777)
    return out


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
    wpath = p / meta["weights"].get("file", WEIGHTS_FILE)
    arch = meta["architecture"]
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
    pre = PreprocessConfig.from_dict(meta["preprocessing"])
    if tuple(int(v) for v in meta["roi_size"]) != tuple(int(v) for v in arch["args"]["img_size"]):
        raise ModelPackageError(
            f"{p}: roi_size {meta['roi_size']} != UNETR img_size {arch['args']['img_size']}"
        )
    return ModelPackage(path=p, meta=meta, network=net, device=dev, preprocess=pre,
                        inference=inference_options(p / "model.json", meta.get("inference", {})))
