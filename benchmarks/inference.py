"""Inference throughput: the useful FLOP rate of a UNETR sliding-window grid against the machine's matmul.

In one run: the sustained throughput of a large ``torch.matmul`` (fp32, and bf16 where the CPU has
AVX-512 BF16/AMX or on CUDA), then for each model (the paper-size UNETR with random weights, the
shipped demo model) the FLOPs of one window (``torch.utils.flop_counter``) times the windows the
sliding-window grid of a 1.5 mm whole-thigh phantom needs, and the time per window of each runtime
variant on real phantom windows. Useful rate = FLOPs per window / seconds per window; the table
prints it as a fraction of the matmul throughput, and the argmax agreement with fp32 eager.

    .venv/bin/python benchmarks/inference.py                       # CPU, default variants
    .venv/bin/python benchmarks/inference.py --variants compile-fp32,compile-bf16 --models demo
    .venv/bin/python benchmarks/inference.py --device cuda         # GPU: autocast, batch search, pinned
    .venv/bin/python benchmarks/inference.py --device cuda --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CPU_VARIANTS = (
    "eager-fp32", "eager-fp32-1t", "eager-fp32-cl", "autocast-bf16", "bf16-weights", "bf16-cl",
    "ort-fp32", "openvino-fp32", "openvino-bf16", "openvino-bf16-tput",
)
SLOW_VARIANTS = ("compile-fp32", "compile-bf16")  # inductor: minutes of compile, asked for by name
CUDA_VARIANTS = ("cuda-fp32", "cuda-bf16", "cuda-fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class Matmul:
    """Sustained matmul throughput of one dtype."""

    dtype: str
    n: int
    gflops: float


@dataclass
class VariantResult:
    """One runtime variant on one model: time per window and what it reaches."""

    variant: str
    precision: str
    seconds_per_window: float
    gflops: float
    of_matmul_fp32: float
    of_matmul_same: float
    argmax_agreement: float
    grid_seconds: float
    setup_seconds: float
    batch: int = 1
    note: str = ""


@dataclass
class ModelResult:
    """A model, its grid on the whole-thigh phantom and every variant timed on it."""

    model: str
    roi: list[int]
    gflop_per_window: float
    model_grid: list[int]
    grid_windows: int
    windows_timed: int
    variants: list[VariantResult] = field(default_factory=list)
    whole_seconds: float | None = None
    whole_runtime: str = ""


# ---------------------------------------------------------------- machine


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    return bool(cpu_flags() & set(BF16_FLAGS))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_throughput(device: str, dtype: str, n: int, seconds: float) -> Matmul:
    """GFLOP/s of repeated n×n @ n×n products, after a warm-up, for about ``seconds``."""
    import torch

    dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dt)
    b = torch.randn(n, n, generator=g).to(device, dt)
    c = torch.empty(n, n, device=device, dtype=dt)
    for _ in range(2):
        torch.matmul(a, b, out=c)
    _sync(device)
    k, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b, out=c)
        k += 1
        if k % 4 == 0:
            _sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    dt_s = time.perf_counter() - t0
    return Matmul(dtype, n, 2.0 * n**3 * k / dt_s / 1e9)


# ---------------------------------------------------------------- models and windows


def grid_starts(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> list[tuple[int, ...]]:
    """Window corners of MONAI's sliding-window grid (same interval rule as ``sliding_window_inference``)."""
    from monai.data.utils import dense_patch_slices

    padded = tuple(max(s, r) for s, r in zip(shape, roi, strict=True))
    interval = tuple(r if r == s else max(int(r * (1 - overlap)), 1)
                     for s, r in zip(padded, roi, strict=True))
    return [tuple(sl.start for sl in w) for w in dense_patch_slices(padded, roi, interval)]


def window_flops(net, roi: tuple[int, ...]) -> float:
    """FLOPs of one forward of one window (torch's flop counter: convolutions and matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 1, *roi))
    return float(fc.get_total_flops())


def phantom_windows(preprocess, roi: tuple[int, ...], k: int, overlap: float, seed: int):
    """The model grid of a 1.5 mm whole-thigh phantom, its window count and its ``k`` central windows."""
    import torch

    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import to_model_grid

    ph = make_phantom(PhantomOptions(seed=seed, spacing_mm=(1.5, 1.5, 1.5)))
    img = to_model_grid(ph.ct, preprocess).image
    pad = [(0, max(0, r - s)) for s, r in zip(img.shape, roi, strict=True)]
    img = np.pad(img, pad)
    starts = grid_starts(img.shape, roi, overlap)
    centre = np.array(img.shape) / 2
    mid = sorted(starts, key=lambda s: float(np.sum((np.array(s) + np.array(roi) / 2 - centre) ** 2)))[:k]
    wins = np.stack([img[tuple(slice(a, a + r) for a, r in zip(s, roi, strict=True))] for s in mid])
    return list(img.shape), len(starts), torch.from_numpy(np.ascontiguousarray(wins[:, None], np.float32))


def load_case(name: str, spacing: float):
    """(network in eval mode, roi, preprocess) for 'paper' (random weights, seed 0) or 'demo'."""
    import torch

    from seg.model import build_network, load_model
    from seg.package import Architecture
    from seg.preprocess_config import PreprocessConfig
    from seg.recipe import PAPER_UNETR

    if name == "paper":
        torch.manual_seed(0)
        net = build_network(Architecture(args=dict(PAPER_UNETR))).eval()
        return net, tuple(PAPER_UNETR["img_size"]), PreprocessConfig(spacing_mm=(spacing,) * 3)
    pkg = load_model(None if name == "demo" else name, device="cpu")
    return pkg.network.eval(), pkg.roi_size, pkg.preprocess


# ---------------------------------------------------------------- runtime variants


@dataclass
class Runner:
    """A variant ready to run: float32 windows in, float32 logits out."""

    precision: str
    fn: Callable
    setup_seconds: float
    note: str = ""


def _torch_runner(net, precision: str, channels_last: bool = False, cast_weights: bool = False,
                  threads: int | None = None) -> Runner:
    import torch

    m = copy.deepcopy(net)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    if cast_weights:
        m = m.to(torch.bfloat16)
    m = m.to(memory_format=fmt)

    def fn(x):
        saved = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            x = x.to(memory_format=fmt)
            if cast_weights:
                return m(x.to(torch.bfloat16)).float()
            bf16 = precision == "bf16"
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                return m(x).float()
        finally:
            torch.set_num_threads(saved)

    return Runner(precision, fn, 0.0)


def _compile_runner(net, precision: str, example) -> Runner:
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant weights: oneDNN weight prepacking, folded constants
    c = torch.compile(copy.deepcopy(net))

    def fn(x):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            return c(x).float()

    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(example)
    return Runner(precision, fn, time.perf_counter() - t0, "setup = compile + first call")


def _onnx_file(net, example, work: Path) -> Path:
    import torch

    path = work / f"net_{sum(p.numel() for p in net.parameters())}_{example.shape[-1]}.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=18, dynamo=False)
    return path


def _ort_runner(net, example, threads: int, work: Path) -> Runner:
    import onnxruntime as ort
    import torch

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(_onnx_file(net, example, work)), so, providers=["CPUExecutionProvider"])
    return Runner("fp32", lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]),
                  time.perf_counter() - t0, "setup = ONNX export + session")


_OV_MODELS: dict = {}


def _openvino_runner(net, example, precision: str, threads: int, throughput: bool) -> Runner:
    import openvino as ov
    import torch

    t0 = time.perf_counter()
    key = (id(net), tuple(example.shape))
    if key not in _OV_MODELS:  # convert once per network; each variant compiles its own
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _OV_MODELS[key] = ov.convert_model(net, example_input=example)
    model = _OV_MODELS[key]
    cfg = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY",
    }
    compiled = ov.Core().compile_model(model, "CPU", cfg)
    setup = time.perf_counter() - t0
    if not throughput:
        req = compiled.create_infer_request()

        def fn(x):
            req.infer({0: x.numpy()})
            return torch.from_numpy(req.get_output_tensor(0).data.copy())

        return Runner(precision, fn, setup, "setup = convert (first OpenVINO variant) + compile")
    streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = ov.AsyncInferQueue(compiled, streams)

    def fn_tput(x):  # one window per request, requests run in parallel streams
        out: list = [None] * x.shape[0]

        def done(req, i):
            out[i] = req.get_output_tensor(0).data.copy()

        queue.set_callback(done)
        for i in range(x.shape[0]):
            queue.start_async({0: x[i : i + 1].numpy()}, i)
        queue.wait_all()
        return torch.from_numpy(np.concatenate(out))

    return Runner(precision, fn_tput, setup, f"{streams} streams, one window per request")


def available(variant: str) -> str | None:
    """None if the variant can run here, else why not."""
    import importlib.util

    if "bf16" in variant and not variant.startswith("cuda") and not cpu_has_bf16():
        return "CPU without AVX-512 BF16/AMX"
    if variant.startswith("ort") and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime not installed"
    if variant.startswith("openvino") and importlib.util.find_spec("openvino") is None:
        return "openvino not installed"
    return None


def make_runner(variant: str, net, example, threads: int, work: Path) -> Runner:
    if variant == "eager-fp32":
        return _torch_runner(net, "fp32")
    if variant == "eager-fp32-1t":
        return _torch_runner(net, "fp32", threads=1)
    if variant == "eager-fp32-cl":
        return _torch_runner(net, "fp32", channels_last=True)
    if variant == "autocast-bf16":
        return _torch_runner(net, "bf16")
    if variant == "bf16-weights":
        return _torch_runner(net, "bf16", cast_weights=True)
    if variant == "bf16-cl":
        return _torch_runner(net, "bf16", channels_last=True, cast_weights=True)
    if variant.startswith("compile-"):
        return _compile_runner(net, variant.split("-")[1], example)
    if variant == "ort-fp32":
        return _ort_runner(net, example, threads, work)
    if variant.startswith("openvino-"):
        prec = variant.split("-")[1]
        return _openvino_runner(net, example, prec, threads, variant.endswith("-tput"))
    raise ValueError(f"unknown variant {variant!r}")


def time_variants(runners: dict[str, Runner], windows, batch: int, repeats: int,
                  each_round: Callable[[], None] = lambda: None) -> dict[str, tuple]:
    """Fastest of ``repeats`` interleaved rounds (every variant once per round, then ``each_round``:
    the matmul again, so a busy machine lowers both sides of the ratio alike) of all windows."""
    import torch

    best: dict[str, float] = {}
    outs: dict[str, object] = {}
    with torch.inference_mode():
        for r in runners.values():  # warm-up (lazy weight packing, first-call allocations)
            r.fn(windows[:batch])
        for _ in range(repeats):
            for name, r in runners.items():
                t0 = time.perf_counter()
                ys = [r.fn(windows[i : i + batch]) for i in range(0, len(windows), batch)]
                dt = (time.perf_counter() - t0) / len(windows)
                print(f"  {name}: {dt:.3f} s/window", file=sys.stderr, flush=True)
                best[name] = min(best.get(name, dt), dt)
                outs[name] = torch.cat(ys).argmax(1)
            each_round()
    return {n: (best[n], outs[n]) for n in runners}


# ---------------------------------------------------------------- CUDA


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """Largest batch in 1, 2, 4, ... ≤ cap for which ``fits`` holds (0 if not even 1)."""
    best, b = 0, 1
    while b <= cap and fits(b):
        best, b = b, b * 2
    return best


def cuda_variant(net, windows, precision: str, max_batch: int, repeats: int):
    """(s/window at the largest batch that fits, batch, argmax) with pinned host windows."""
    import torch

    dev = torch.device("cuda")
    m = copy.deepcopy(net).to(dev).eval()
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def run(host):
        x = host.to(dev, non_blocking=True)
        ctx = torch.autocast("cuda", dtype=dt) if dt else contextlib.nullcontext()
        with ctx:
            y = m(x)
        return y.argmax(1).to("cpu", non_blocking=True)

    def batch_of(b):
        reps = -(-b // len(windows))
        return windows.repeat(reps, 1, 1, 1, 1)[:b].pin_memory()

    def fits(b) -> bool:
        try:
            with torch.inference_mode():
                run(batch_of(b))
            torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False

    batch = largest_fitting(fits, max_batch)
    host = batch_of(batch)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                y = run(host)
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / (3 * batch))
        y = run(windows.pin_memory())
        torch.cuda.synchronize()
    return best, batch, y


# ---------------------------------------------------------------- report


def table(res: ModelResult, mm: dict[str, Matmul]) -> str:
    lines = [
        f"{res.model}: {res.gflop_per_window:.1f} GFLOP per {'x'.join(map(str, res.roi))} window; "
        f"grid on {'x'.join(map(str, res.model_grid))}:",
        f"  {res.grid_windows} windows = {res.gflop_per_window * res.grid_windows / 1000:.2f} TFLOP",
        f"{'variant':<19}{'s/win':>7}{'GFLOP/s':>8}{'/mm32':>6}{'/mmP':>6}{'argmax':>8}"
        f"{'grid s':>8}{'setup':>7}{'vs fp32':>8}",
    ]
    ref = next((v for v in res.variants if v.variant in ("eager-fp32", "cuda-fp32")), None)
    for v in res.variants:
        speed = ref.seconds_per_window / v.seconds_per_window if ref else float("nan")
        lines.append(
            f"{v.variant:<19}{v.seconds_per_window:>7.3f}{v.gflops:>8.1f}{v.of_matmul_fp32:>6.2f}"
            f"{v.of_matmul_same:>6.2f}{v.argmax_agreement:>8.4f}{v.grid_seconds:>8.1f}"
            f"{v.setup_seconds:>7.1f}{speed:>7.2f}x"
        )
        if v.note:
            lines.append(f"{'':<19}  {v.note}")
    if res.whole_seconds:
        rate = res.gflop_per_window * res.grid_windows / res.whole_seconds
        of = ", ".join(f"{rate / m.gflops:.2f} x matmul {m.dtype}" for m in mm.values())
        lines.append(f"whole grid, {res.whole_runtime}: {res.whole_seconds:.2f} s = {rate:.1f} GFLOP/s "
                     "useful")
        lines.append(f"  = {of}")
    lines.append("/mm32, /mmP: useful rate / matmul throughput in fp32 / in the variant's precision")
    lines.append("argmax: share of voxels with fp32 eager's argmax; grid s: s/win x grid windows")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="paper,demo", help="paper, demo or a package folder (comma list)")
    ap.add_argument("--variants", default=None,
                    help=f"comma list (CPU default: {','.join(CPU_VARIANTS)}; "
                    f"also {','.join(SLOW_VARIANTS)})")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/ORT/OpenVINO threads")
    ap.add_argument("--windows", type=int, default=2, help="phantom windows timed per variant")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest counts")
    ap.add_argument("--batch", type=int, default=1, help="windows per forward on CPU")
    ap.add_argument("--max-batch", type=int, default=64, help="CUDA: largest batch tried")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--spacing", type=float, default=1.5, help="model grid spacing of the paper UNETR (mm)")
    ap.add_argument("--matmul-n", type=int, default=None, help="matmul size (CPU 2048, CUDA 8192)")
    ap.add_argument("--matmul-seconds", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=424242, help="phantom seed")
    ap.add_argument("--whole", action="store_true",
                    help="also time the node's inference (seg.infer) on the whole phantom's grid")
    ap.add_argument("--runtime", default="torch", choices=["auto", "torch", "openvino"],
                    help="--whole: seg.runtime choice (precision: DICOMNODE_CPU_PRECISION)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing heavy")
    ap.add_argument("--work", default="/tmp/bench-inference")
    ap.add_argument("--out", default=None, help="write results.json into this folder")
    args = ap.parse_args(argv)
    if args.variants is None:
        args.variants = ",".join(CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS)
    args.variant_list = [v for v in args.variants.split(",") if v]
    known = CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS + SLOW_VARIANTS
    bad = [v for v in args.variant_list if v not in known]
    if bad:
        ap.error(f"unknown variants for {args.device}: {bad} (known: {', '.join(known)})")
    if args.matmul_n is None:
        args.matmul_n = 8192 if args.device == "cuda" else 2048
    return args


def plan(args) -> dict:
    """What a run would do (printed by --dry-run, and at the head of every run)."""
    mm = ["fp32"] + (["bf16", "fp16"] if args.device == "cuda" else (["bf16"] if cpu_has_bf16() else []))
    skipped = {v: why for v in args.variant_list if args.device == "cpu" and (why := available(v))}
    return {
        "device": args.device,
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, bf16 flags: "
                f"{sorted(cpu_flags() & set(BF16_FLAGS)) or 'none'}",
        "threads": args.threads,
        "matmul": {"n": args.matmul_n, "dtypes": mm, "seconds": args.matmul_seconds},
        "models": args.models.split(","),
        "variants": [v for v in args.variant_list if v not in skipped],
        "skipped": skipped,
        "windows": args.windows,
        "repeats": args.repeats,
        "batch": f"largest that fits, <= {args.max_batch}" if args.device == "cuda" else args.batch,
    }


def main(argv=None) -> int:
    args = parse(argv)
    p = plan(args)
    print(json.dumps(p, indent=1), flush=True)
    if args.dry_run:
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mm = {d: matmul_throughput(args.device, d, args.matmul_n, args.matmul_seconds)
          for d in p["matmul"]["dtypes"]}
    print(f"matmul ({args.device}, {args.threads} threads, n={args.matmul_n}): "
          + ", ".join(f"{m.dtype} {m.gflops:.1f} GFLOP/s" for m in mm.values()), flush=True)
    results = []
    for name in p["models"]:
        net, roi, pre = load_case(name, args.spacing)
        gflop = window_flops(net, roi) / 1e9
        grid, n_grid, wins = phantom_windows(pre, roi, args.windows, args.overlap, args.seed)
        res = ModelResult(Path(name).name, list(roi), gflop, grid, n_grid, len(wins))
        if args.device == "cuda":
            timed = {}
            for v in p["variants"]:
                s, b, y = cuda_variant(net, wins, v.split("-")[1], args.max_batch, args.repeats)
                timed[v] = (s, y, Runner(v.split("-")[1], None, 0.0, f"batch {b}, pinned"), b)
        else:
            runners = {}
            for v in p["variants"]:
                runners[v] = make_runner(v, net, wins[: args.batch], args.threads, work)
                print(f"  {v}: ready in {runners[v].setup_seconds:.1f} s", file=sys.stderr, flush=True)
            def remeasure() -> None:  # keep the best matmul seen, as the windows keep their best
                for d, m in mm.items():
                    again = matmul_throughput(args.device, d, args.matmul_n, 1.0)
                    if again.gflops > m.gflops:
                        mm[d] = again

            times = time_variants(runners, wins, args.batch, args.repeats, remeasure)
            timed = {v: (s, y, runners[v], args.batch) for v, (s, y) in times.items()}
            print("matmul, best of the run: " + ", ".join(f"{m.dtype} {m.gflops:.1f} GFLOP/s"
                                                         for m in mm.values()), flush=True)
        ref = next((y for v, (s, y, r, b) in timed.items() if v in ("eager-fp32", "cuda-fp32")), None)
        for v, (s, y, r, b) in timed.items():
            rate = gflop / s
            same = mm.get(r.precision, mm["fp32"]).gflops
            agree = float((y == ref).float().mean()) if ref is not None else float("nan")
            res.variants.append(VariantResult(v, r.precision, s, rate, rate / mm["fp32"].gflops, rate / same,
                                              agree, s * n_grid, r.setup_seconds, b, r.note))
        if args.whole:  # on CUDA with the largest batch found above
            res.whole_seconds = whole_seconds(name, args, max((v.batch for v in res.variants), default=None))
            res.whole_runtime = "cuda" if args.device == "cuda" else args.runtime
        print(table(res, mm), flush=True)
        results.append(res)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(
            {"plan": p, "matmul": [asdict(m) for m in mm.values()], "models": [asdict(r) for r in results]},
            indent=1))
    return 0


def whole_seconds(name: str, args, sw_batch: int | None = None) -> float:
    """Wall time of ``seg.infer.predict_probabilities`` on the whole phantom's model grid."""
    import torch

    from seg.infer import predict_probabilities
    from seg.model import in_memory_package, load_model
    from seg.phantom import PhantomOptions, make_phantom
    from seg.preprocess import to_model_grid
    from seg.runtime import prepare

    net, roi, pre = load_case(name, args.spacing)
    if name == "paper":
        from seg.recipe import PAPER_UNETR

        pkg = in_memory_package(net, dict(PAPER_UNETR), pre, torch.device(args.device))
        pkg.network.to(pkg.device)
    else:
        pkg = load_model(None if name == "demo" else name, device=args.device)
    t0 = time.perf_counter()
    pkg = prepare(pkg, args.runtime)
    print(f"  whole grid: runtime {args.runtime} ready in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    img = to_model_grid(make_phantom(PhantomOptions(seed=args.seed, spacing_mm=(1.5,) * 3)).ct, pre).image
    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    predict_probabilities(pkg, img, overlap=args.overlap, sw_batch=sw_batch if cuda else None,
                          precision=None if cuda else "fp32")  # OpenVINO: its own precision
    _sync(args.device)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
