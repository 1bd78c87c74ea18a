"""Which runtime computes the network's windows: PyTorch, or OpenVINO on CPU.

Why: on the project's CPU a UNETR window runs several times faster compiled by OpenVINO than in
PyTorch eager (fused instance norm and activations, oneDNN/AMX kernels; in bf16 on CPUs with AVX-512
BF16/AMX), with argmax agreement ≥ 99.9 % against fp32 — figures and commands in
``docs/benchmarks.md`` ("Inference throughput"). OpenVINO is an optional extra
(``pip install 'dicomnode[openvino]'``, about 180 MB): without it, or on CUDA, PyTorch runs as before.

The choice is ``worker.runtime`` (``auto`` | ``torch`` | ``openvino``; environment
``DICOMNODE_WORKER__RUNTIME``). ``auto`` takes OpenVINO when it is installed and the device is the
CPU. Its precision follows ``DICOMNODE_CPU_PRECISION``: ``fp32``, ``bf16``, or ``auto`` = bf16 where
the CPU has AVX-512 BF16/AMX. The converted model is cached on disk (keyed by the weights' sha256),
so a job process compiles it in about a second instead of converting it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from seg.model import ModelPackage
from seg.recipe import PRECISIONS, RUNTIMES, Runtime, cpu_precision

if TYPE_CHECKING:
    import openvino as ov  # the optional [openvino] extra

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class RuntimeChoice:
    """The backend that runs the windows, at which precision, and why (logged once per load)."""

    backend: str  # "torch" | "openvino"
    precision: str  # "fp32" | "bf16" for OpenVINO; "as seg.infer decides" for torch
    reason: str


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX-512 BF16 or AMX-BF16 (bf16 then runs at hardware speed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[1].split()) & set(BF16_CPU_FLAGS))
    return False


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose(requested: Runtime, device: torch.device, precision: str | None = None) -> RuntimeChoice:
    """The runtime for ``requested`` (one of :data:`RUNTIMES`: the ``worker.runtime`` setting) on
    ``device``."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime {requested!r} is not one of {', '.join(RUNTIMES)}")
    if requested == "torch":
        return RuntimeChoice("torch", "seg.infer", "asked for")
    if device.type != "cpu":
        if requested == "openvino":
            raise ValueError(f"the OpenVINO runtime runs on the CPU only, not on {device}")
        return RuntimeChoice("torch", "seg.infer", f"{device.type}: PyTorch with autocast")
    if not openvino_installed():
        if requested == "openvino":
            raise ValueError("runtime 'openvino' needs the optional extra: pip install 'dicomnode[openvino]'")
        return RuntimeChoice("torch", "seg.infer", "OpenVINO not installed")
    p = precision or cpu_precision()
    if p not in PRECISIONS:
        raise ValueError(f"precision {p!r} is not one of {', '.join(PRECISIONS)} (DICOMNODE_CPU_PRECISION)")
    bf16 = p == "bf16" or (p == "auto" and cpu_has_bf16())
    why = "asked for" if requested == "openvino" else "auto: installed, CPU"
    return RuntimeChoice("openvino", "bf16" if bf16 else "fp32", why)


class OpenVINONetwork(torch.nn.Module):
    """A compiled OpenVINO model called like the torch network: float32 windows (B, 1, X, Y, Z) in,
    float32 logits (B, C, X, Y, Z) out. The model is compiled for one window; the windows of a batch
    go to parallel infer requests (OpenVINO's throughput streams)."""

    def __init__(self, compiled: ov.CompiledModel, requests: int) -> None:
        super().__init__()
        import openvino as ov

        self._queue = ov.AsyncInferQueue(compiled, max(1, requests))
        self._lock = threading.Lock()  # one batch at a time: the queue's callback writes shared slots
        self.requests = max(1, requests)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out: list[np.ndarray | None] = [None] * len(windows)

        def done(request, i: int) -> None:
            out[i] = request.get_output_tensor(0).data.copy()

        with self._lock:
            self._queue.set_callback(done)
            for i in range(len(windows)):
                self._queue.start_async({0: windows[i : i + 1]}, i)
            self._queue.wait_all()
        return torch.from_numpy(np.concatenate(out))  # type: ignore[arg-type]


def _convert(pkg: ModelPackage):
    """The network traced into an OpenVINO model for one window (fixed shape: fastest kernels)."""
    import openvino as ov

    with warnings.catch_warnings():  # TorchScript tracing warns about shape checks made constant
        warnings.simplefilter("ignore")
        return ov.convert_model(pkg.network.cpu().eval(), example_input=torch.zeros(1, 1, *pkg.roi_size))


def _converted(pkg: ModelPackage, cache_dir: Path | None) -> Path | object:
    """The package's network as an OpenVINO model: a cached IR file, or an in-memory model when there is
    no usable cache (no sha256 to key it, or a folder we cannot write)."""
    import openvino as ov

    sha = pkg.meta.weights.sha256
    if cache_dir is None or not sha:
        return _convert(pkg)
    key = f"{sha[:24]}-{'x'.join(map(str, pkg.roi_size))}-ov{ov.get_version().split('-')[0]}"
    xml = cache_dir / key / "model.xml"
    if xml.is_file():
        return xml
    model = _convert(pkg)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    except OSError as e:
        log.warning("OpenVINO cache %s not writable (%s): converting in every process", cache_dir, e)
        return model
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        with contextlib.suppress(OSError):  # another process may have won the race: theirs is as good
            tmp.rename(cache_dir / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml if xml.is_file() else model


def compile_openvino(pkg: ModelPackage, precision: str, cache_dir: Path | None = None,
                     threads: int | None = None) -> OpenVINONetwork:
    """Convert (or take from ``cache_dir``) and compile ``pkg``'s network for this CPU."""
    import openvino as ov

    model = _converted(pkg, cache_dir)
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
    }
    compiled = ov.Core().compile_model(str(model) if isinstance(model, Path) else model, "CPU", config)
    return OpenVINONetwork(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicomnode" / "openvino"


def prepare(pkg: ModelPackage, requested: Runtime, cache_dir: Path | None = None,
            precision: str | None = None) -> ModelPackage:
    """``pkg`` ready for inference on the chosen runtime (the same package when that is PyTorch)."""
    choice = choose(requested, pkg.device, precision)
    log.info("inference runtime: %s (%s; %s)", choice.backend, choice.precision, choice.reason)
    if choice.backend == "torch":
        return pkg
    net = compile_openvino(pkg, choice.precision, cache_dir if cache_dir is not None else default_cache_dir())
    return dataclasses.replace(pkg, network=net)
