"""The inference runtime choice (seg/runtime.py) and the throughput benchmark's own logic.

Why: OpenVINO replaces PyTorch for every window on CPU when installed, so its output must agree with
fp32 PyTorch on real phantom windows of the shipped model, its disk cache must be reused, and a
wrong request must fail loudly. The benchmark's window count must be MONAI's, and its CUDA path
(autocast, batch search, pinned memory) must at least parse and plan on a machine without a GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import inference as bench
from seg import runtime
from seg.model import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_choose_torch_when_asked_or_not_on_cpu() -> None:
    assert runtime.choose("torch", torch.device("cpu")).backend == "torch"
    assert runtime.choose("auto", torch.device("cuda")).backend == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        runtime.choose("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="not one of"):
        runtime.choose("tensorrt", torch.device("cpu"))


def test_choose_openvino_precision() -> None:
    pytest.importorskip("openvino")
    cpu = torch.device("cpu")
    want = runtime.RuntimeChoice("openvino", "fp32", "auto: installed, CPU")
    assert runtime.choose("auto", cpu, "fp32") == want
    assert runtime.choose("openvino", cpu, "bf16").precision == "bf16"
    assert runtime.choose("openvino", cpu, "auto").precision == ("bf16" if runtime.cpu_has_bf16() else "fp32")
    with pytest.raises(ValueError, match="DICOMNODE_CPU_PRECISION"):
        runtime.choose("openvino", cpu, "int8")


@pytest.fixture(scope="module")
def phantom_windows() -> torch.Tensor:
    """Two real 48³ windows of a short phantom on the demo model's grid (thigh muscles in both)."""
    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import to_model_grid

    pkg = load_model(None, device="cpu")
    ph = make_phantom(PhantomOptions(seed=7, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-150.0, 60.0)))
    img = to_model_grid(ph.ct, pkg.preprocess).image
    r = pkg.roi_size[0]
    img = np.pad(img, [(0, max(0, r - s)) for s in img.shape])
    cx, cy = img.shape[0] // 2, img.shape[1] // 2
    starts = [(max(0, cx - r), max(0, cy - r // 2), 0), (cx, max(0, cy - r // 2), img.shape[2] - r)]
    wins = [img[x : x + r, y : y + r, z : z + r] for x, y, z in starts]
    return torch.from_numpy(np.stack(wins)[:, None].astype(np.float32))


def _argmax_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_agrees_with_fp32_torch_on_phantom_windows(phantom_windows, precision, tmp_path) -> None:
    pytest.importorskip("openvino")
    if precision == "bf16" and not runtime.cpu_has_bf16():
        pytest.skip("CPU without AVX-512 BF16/AMX: bf16 is not chosen here")
    pkg = load_model(None, device="cpu")
    with torch.inference_mode():
        ref = pkg.network(phantom_windows)
    assert (ref.argmax(1) > 0).float().mean() > 0.2  # windows with anatomy, not background only
    fast = runtime.prepare(pkg, "openvino", cache_dir=tmp_path, precision=precision)
    assert isinstance(fast.network, runtime.OpenVINONetwork) and fast.meta is pkg.meta
    out = fast.network(phantom_windows)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _argmax_agreement(out, ref) >= 0.999
    # the converted model is cached by the weights' sha256 and reused by the next load
    (xml,) = tmp_path.glob("*/model.xml")
    assert xml.parent.name.startswith(pkg.meta.weights.sha256[:24])
    before = xml.stat().st_mtime_ns
    again = runtime.prepare(load_model(None, device="cpu"), "openvino", tmp_path, precision=precision)
    assert xml.stat().st_mtime_ns == before
    assert _argmax_agreement(again.network(phantom_windows[:1]), ref[:1]) >= 0.999


def test_window_batch_fills_every_openvino_request(tmp_path) -> None:
    """A batch with fewer windows than the compiled model's parallel requests leaves a stream idle."""
    pytest.importorskip("openvino")
    from seg import infer

    pkg = load_model(None, device="cpu")
    fast = runtime.prepare(pkg, "openvino", cache_dir=tmp_path, precision="fp32")
    requests = fast.network.requests
    assert requests >= 1
    cpu = torch.device("cpu")
    assert infer._default_sw_batch(cpu, (96, 96, 96)) == 1  # paper-size windows, PyTorch: one at a time
    assert infer._default_sw_batch(cpu, (96, 96, 96), requests) == requests
    assert infer._default_sw_batch(cpu, (48, 48, 48), requests) == max(4, requests)
    seen: list[int] = []
    net = fast.network
    forward = net.forward

    def counting(x: torch.Tensor) -> torch.Tensor:
        seen.append(int(x.shape[0]))
        return forward(x)

    net.forward = counting  # type: ignore[method-assign]
    image = np.zeros((60, 60, 120), np.float32)
    infer.predict_probabilities(fast, image, precision="fp32", mirror=False)  # one window per request
    assert max(seen) == max(4, requests)  # the node's call path passes no batch: the default decides


def test_torch_runtime_returns_the_package_unchanged() -> None:
    pkg = load_model(None, device="cpu")
    assert runtime.prepare(pkg, "torch") is pkg


def test_benchmark_window_count_is_monais(tmp_path) -> None:
    """grid_starts counts the windows MONAI's sliding_window_inference actually runs."""
    from monai.inferers import sliding_window_inference

    seen: list[int] = []

    def count(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x

    cases = (((70, 50, 100), (32, 32, 32)), ((20, 64, 33), (32, 32, 32)), ((96, 96, 96), (96, 96, 96)))
    for shape, roi in cases:
        seen.clear()
        sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, count, overlap=0.25)
        assert len(bench.grid_starts(shape, roi, 0.25)) == sum(seen), shape


def test_batch_search_takes_the_largest_power_of_two_that_fits() -> None:
    budget = 37 * 96**3 * 4  # bytes: 37 windows of float32 fit
    assert bench.largest_fitting(lambda b: b * 96**3 * 4 <= budget, cap=64) == 32
    assert bench.largest_fitting(lambda b: b * 96**3 * 4 <= budget, cap=8) == 8
    assert bench.largest_fitting(lambda b: False, cap=64) == 0


def test_benchmark_cuda_dry_run_plans_without_a_gpu() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--device", "cuda", "--dry-run"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    plan = bench.json.loads(p.stdout)
    assert plan["variants"] == list(bench.CUDA_VARIANTS)
    assert plan["matmul"]["dtypes"] == ["fp32", "bf16", "fp16"] and plan["matmul"]["n"] == 8192
    assert plan["batch"].startswith("largest that fits")
    bad = subprocess.run(cmd + ["--variants", "eager-fp32"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert bad.returncode == 2 and "unknown variants" in bad.stderr
