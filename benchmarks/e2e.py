"""End-to-end latency through a real Orthanc: stable-series event → last output stored in Orthanc.

A whole-thigh phantom study (1.5 mm by default: 400 slices) is uploaded to Orthanc over REST;
Orthanc's ``route.lua`` forwards it when stable; ``dicomnode serve`` measures it and sends SEG, SR
and summary back. The time from Orthanc's stable-series event (its routing log line) to the last
output stored in Orthanc is split along the critical path into:

    receive          routing event → last instance stored at the node (Orthanc C-STORE to the node)
    stable wait      last instance → series declared complete (the node's stable_seconds; with
                     +release, the release of Orthanc's association)
    selection+pickup complete → job running (header check, queue, worker poll)
    process start    pipeline process spawned → running (only the part after the job was picked up)
    warm-up          imports and model load before the first job (likewise: only what the job waited)
    dicom load, model load, inference, measure, results write, SEG/SR/summary encoding,
    outputs write, pairing, follow-up reports
                     the pipeline's own phases (``<job folder>/phases.jsonl``, dicomnode/processing/phases.py)
    handover         the rest of the isolated call (job and answer through the pipe)
    outcome recorded the worker writes the outbox rows
    send             job in sending → last C-STORE success from Orthanc (sender poll + association)
                     (the SEG and SR are handed to the sender as soon as each is on disk, so part of
                     their sending overlaps the pipeline: this row is what is left after the job ends)

``overhead`` is the total minus inference: the issue #14 target is ≤ 5 s for a 400-slice study.
``--modes cold,warm`` runs the node as it was before this benchmark's last round of changes (see
``run_node``) and as it is, side by side, for a before/after in one run. ``+release`` (``warm+release``)
sets the node's ``series_complete_on_release``: the series is complete when Orthanc releases its
association, ``stable_seconds`` = 1 staying the fallback; plain ``warm`` keeps the earlier figure.
Not a timed test.

    .venv/bin/python benchmarks/e2e.py                       # 1.5 mm, CPU, one run
    .venv/bin/python benchmarks/e2e.py --modes cold,warm     # before/after side by side
    .venv/bin/python benchmarks/e2e.py --modes warm,warm+release   # quiet wait vs. release
    .venv/bin/python benchmarks/e2e.py --spacing 3,3,5 --runs 2 --device cpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dicomnode.commands.common import parse_spacing
from dicomnode.harness.net import free_port, port_open, stop_process, wait_for
from dicomnode.harness.orthanc import OrthancServer
from dicomnode.harness.tomlfile import write_toml
from dicomnode.processing.phases import read_spans

REPO = Path(__file__).resolve().parents[1]
ROUTED = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+) .*thigh-routing: series (\S+) routed to")


# -------------------------------------------------------------------------------------------
# The node process
# -------------------------------------------------------------------------------------------
def run_node(config: str, cold: bool, pipeline: str | None = None) -> None:
    """``dicomnode serve``; with ``cold``, the node's loops as they were before the warm pipeline
    process: a fresh pipeline process per job (its start, imports and model load then happen after
    the job was picked up), the worker and the sender on their poll ticks (no wake-ups), and every
    output decoded and encoded again for sending. (The SEG written in the background while the SR is
    built happens in the pipeline process, which these patches do not reach: it is in both modes.)"""
    from dicomnode.network import sender
    from dicomnode.processing import isolation, wakeups

    if cold:
        for wakeup in (wakeups.JOB_QUEUED, wakeups.OUTPUTS_READY):
            wakeup.set = lambda: None  # type: ignore[method-assign]
        sender._streamable = lambda *_: False
        warm_run = isolation.PipelineProcess.run

        def cold_run(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.close()  # the pre-started process too: the job pays for the start
            try:
                return warm_run(self, *args, **kwargs)
            finally:
                self.close()

        isolation.PipelineProcess.run = cold_run  # type: ignore[method-assign]
    args = ["serve", "--config", config] + (["--pipeline", pipeline] if pipeline else [])
    from dicomnode.cli import app

    app(args, standalone_mode=True)


# -------------------------------------------------------------------------------------------
# The benchmark
# -------------------------------------------------------------------------------------------
def routed_at(log: Path, orthanc_series_id: str) -> float | None:
    """Epoch time of Orthanc's routing log line for a series (Orthanc logs local time, no year)."""
    for line in log.read_text(errors="replace").splitlines():
        m = ROUTED.match(line)
        if m and m.group(3) == orthanc_series_id:
            mmdd, hms = m.group(1), m.group(2)
            year = dt.date.today().year
            stamp = dt.datetime.strptime(f"{year}{mmdd} {hms}", "%Y%m%d %H:%M:%S.%f")
            return stamp.timestamp()
    return None


PIPELINE_PHASES = ("dicom load", "model load", "inference", "measure", "results write", "SEG encoding",
                   "SR encoding", "summary encoding", "outputs write", "pairing", "baseline load",
                   "follow-up reports")
KEYS = ("receive", "stable wait", "selection+pickup", "process start", "warm-up", *PIPELINE_PHASES,
        "handover", "outcome recorded", "send", "total", "overhead")


def breakdown(spans: list[Any], job: Any, ser: Any, event: float | None, end: float) -> dict[str, float]:
    """Critical-path seconds per phase (see the module doc) from the job's phases and index times."""
    started = float(job["started_at"])

    def total(phase: str, clip: float = 0.0) -> float:
        return sum(max(0.0, s.end - max(s.start, clip)) for s in spans if s.phase == phase)

    call = next((s for s in spans if s.phase == "isolated call"), None)
    recorded = next((s for s in spans if s.phase == "outcome recorded"), None)
    parts: dict[str, float] = {
        "receive": ser["last_received_at"] - (event or ser["first_received_at"]),
        "stable wait": job["complete_at"] - ser["last_received_at"],
        "selection+pickup": started - job["complete_at"],
        "process start": total("process start", started),
        "warm-up": total("warm-up", started),
    }
    for phase in PIPELINE_PHASES:
        parts[phase] = total(phase)
    inner = sum(parts[k] for k in ("process start", "warm-up", *PIPELINE_PHASES))
    parts["handover"] = (call.seconds if call else 0.0) - inner
    parts["outcome recorded"] = recorded.seconds if recorded else 0.0
    parts["send"] = end - (recorded.end if recorded else end)
    parts["total"] = end - (event or ser["first_received_at"])
    parts["overhead"] = parts["total"] - parts["inference"]
    return parts


@functools.cache
def phantom_study(folder: Path, spacing: tuple[float, float, float], seed: int) -> tuple[Path, str, str]:
    """(DICOM folder, series UID, study UID) of the benchmark's phantom, written once per seed."""
    from seg.phantom import PhantomOptions, make_phantom, write_phantom

    t = time.time()
    ph = make_phantom(PhantomOptions(seed=seed, spacing_mm=spacing, patient_id=f"BENCH{seed}"))
    dicom = Path(write_phantom(ph, folder / f"phantom-{seed}")) / "dicom"
    print(f"  phantom {ph.ct.array.shape} at {spacing} mm ({time.time() - t:.1f} s)")
    return dicom, str(ph.header.series_instance_uid), str(ph.header.study_instance_uid)


def one_run(workdir: Path, spacing: tuple[float, float, float], device: str, seed: int, cold: bool,
            pipeline: str | None = None, model: Path | None = None,
            seg_type: str = "FRACTIONAL", release: bool = False) -> dict[str, float]:
    from dicomnode.network.sop import is_ct

    workdir.mkdir(parents=True, exist_ok=True)
    folder, series_uid, study_uid = phantom_study(workdir.parent, spacing, seed)
    n_files = len(list(folder.glob("*.dcm")))

    node_port = free_port()
    orthanc = OrthancServer(workdir / "orthanc", node_port=node_port, stable_age=2)
    storage = workdir / "node"
    config = workdir / "node.toml"
    write_toml(config, {
        "ae_title": "THIGHNODE", "host": "127.0.0.1", "port": node_port, "storage_dir": str(storage),
        "model_path": str(model.resolve()) if model else None, "stable_seconds": 1,
        "series_complete_on_release": release,
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
        "worker": {"device": device}, "send": {"initial_backoff_seconds": 1},
        "pairing": {"retrieve_priors": False}, "output": {"seg_type": seg_type},
    })
    node = None
    try:
        orthanc.start()
        with (workdir / "node.log").open("ab") as log:
            cmd = [sys.executable, __file__, "_node", str(config), "cold" if cold else "warm"]
            cmd += [pipeline] if pipeline else []
            node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(lambda: port_open(node_port, timeout=1), 120, what="the node")
        t = time.time()
        orthanc.upload_folder(folder)
        print(f"  uploaded {n_files} instances to Orthanc over REST in {time.time() - t:.1f} s")

        def done() -> float | None:
            if node is not None and node.poll() is not None:
                raise RuntimeError(f"node exited; see {workdir / 'node.log'}")
            db = storage / "index.sqlite"
            if not db.exists():
                return None
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                row = con.execute("SELECT state, reason FROM jobs WHERE series_uid=? ORDER BY id DESC",
                                  (series_uid,)).fetchone()
            if row and row[0] in ("failed", "rejected"):
                raise RuntimeError(f"job {row[0]}: {row[1]}")
            return time.time() if row and row[0] == "done" else None

        done_seen = wait_for(done, 3600, interval=0.2, what="the job to be done")
        classes = [orthanc.get_bytes(f"/instances/{i['ID']}/metadata/SopClassUid").decode()
                   for i in orthanc.get(f"/studies/{orthanc.study_id(study_uid)}/instances")]
        n_out = sum(not is_ct(c) for c in classes)
        print(f"  {n_out} outputs stored in Orthanc")
        with sqlite3.connect(f"file:{storage / 'index.sqlite'}?mode=ro", uri=True) as con:
            con.row_factory = sqlite3.Row
            job = con.execute("SELECT * FROM jobs WHERE series_uid=? AND state='done' ORDER BY id DESC",
                              (series_uid,)).fetchone()
            ser = con.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            sent = con.execute("SELECT max(sent_at) FROM outbox WHERE job_id=?", (job["id"],)).fetchone()[0]
        orthanc_series = orthanc.lookup(series_uid, "Series")
        event = routed_at(orthanc.log_path, orthanc_series or "")
        end = sent or done_seen  # C-STORE success from Orthanc (SyncStorageArea: on disk)
        parts = breakdown(read_spans(storage / "jobs" / str(job["id"])), job, ser, event, end)
        parts["instances"] = float(n_files)
        parts["outputs"] = float(n_out)
        parts["event_from_log"] = float(event is not None)
        return parts
    finally:
        stop_process(node)
        orthanc.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_node":
        run_node(argv[1], argv[2] == "cold", argv[3] if len(argv) > 3 else None)
        return 0
    ap = argparse.ArgumentParser(description="Orthanc stable series → last output stored in Orthanc.")
    ap.add_argument("--spacing", default="1.5,1.5,1.5", help="phantom voxel size col,row,slice mm")
    ap.add_argument("--runs", type=int, default=1, help="runs per mode")
    ap.add_argument("--modes", default="warm",
                    help="comma-separated: warm (the node as it is), cold (as before, see run_node); "
                         "each with an optional +release (series_complete_on_release) and :SEG_TYPE "
                         "(default FRACTIONAL), e.g. warm+release:LABELMAP")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="keep work files here (default: a temporary folder)")
    ap.add_argument("--pipeline", help="stand-in pipeline module:function (plumbing check; PYTHONPATH)")
    ap.add_argument("--model", type=Path, help="model package folder (default: the shipped demo model)")
    args = ap.parse_args(argv)
    try:
        spacing = parse_spacing(args.spacing)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"torch {torch.__version__}, GPU: {gpu}, device setting: {args.device}")
    except ImportError:
        pass
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or {m.partition(":")[0] for m in modes} - {"warm", "cold", "warm+release", "cold+release"}:
        ap.error("--modes takes warm and/or cold, each with an optional +release and :SEG_TYPE")
    results, names = [], []
    base = args.keep or Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    for run in range(args.runs):
        for mode in modes:
            variant, _, seg_type = mode.partition(":")
            kind, _, flag = variant.partition("+")
            names.append(f"{mode} {run + 1}" if args.runs > 1 else mode)
            print(f"run {names[-1]}")
            results.append(one_run(base / f"{kind}-{flag or 'quiet'}-{seg_type or 'FRACTIONAL'}-{run}",
                                   spacing, args.device, args.seed + run, kind == "cold",  # type: ignore[arg-type]
                                   args.pipeline, args.model, seg_type.upper() or "FRACTIONAL",
                                   release=flag == "release"))
            if not results[-1]["event_from_log"]:
                print("  (no routing log line found; 'receive' counts from the first instance at the node)")
    width = max(10, *(len(n) + 2 for n in names))
    print(f"\n{'phase (s)':18s}" + "".join(f"{n:>{width}s}" for n in names))
    for k in KEYS:
        if k in ("total", "overhead") or any(abs(r[k]) >= 0.005 for r in results):
            print(f"{k:18s}" + "".join(f"{r[k]:{width}.2f}" for r in results))
    print(f"{'instances':18s}" + "".join(f"{int(r['instances']):{width}d}" for r in results))
    print(f"{'outputs':18s}" + "".join(f"{int(r['outputs']):{width}d}" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
