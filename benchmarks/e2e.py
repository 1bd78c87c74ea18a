"""End-to-end latency through a real Orthanc: stable-series event → last output stored in Orthanc.

A whole-thigh phantom study (1.5 mm by default) is uploaded to Orthanc over REST; Orthanc's
``route.lua`` forwards it when stable; ``dicomnode serve`` measures it and sends SEG, SR and summary
back. The time from Orthanc's stable-series event (its routing log line) to the last output stored
in Orthanc is split into:

    receive      routing event → last instance stored at the node (Orthanc C-STORE to the node)
    stable wait  last instance → series declared complete (the node's stable_seconds)
    queue wait   complete → job started by the worker
    load/measure pipeline time that is neither inference nor encoding (read, resample, volumes, pairing)
    inference    seg.infer.segment
    encoding     building and writing SEG, SR, summary (and follow-up SR)
    send         pipeline end → last output seen stored in Orthanc (sender C-STORE + Orthanc write)

Job timestamps come from the node's SQLite index; inference/encoding from timing wrappers installed
in the node process (this script re-runs itself as the node with ``_node``). Not a timed test.

    .venv/bin/python benchmarks/e2e.py                       # 1.5 mm, CPU, one run
    .venv/bin/python benchmarks/e2e.py --spacing 3,3,5 --runs 2 --device cpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dicomnode.harness.net import free_port, parse_spacing, port_open, wait_for
from dicomnode.harness.orthanc import OrthancServer
from dicomnode.harness.tomlfile import write_toml

REPO = Path(__file__).resolve().parents[1]
ROUTED = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+) .*thigh-routing: series (\S+) routed to")


# -------------------------------------------------------------------------------------------
# The node process with timing wrappers
# -------------------------------------------------------------------------------------------
def _timed(fn: Any, phase: str, sink: Path, uid_of: Any) -> Any:
    lock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = time.time()
            try:
                uid = uid_of(*args)
            except Exception:  # noqa: BLE001 - timing must never break the node
                uid = ""
            with lock, sink.open("a") as fh:
                fh.write(json.dumps({"series": uid, "phase": phase, "start": t0, "end": t1}) + "\n")

    return wrapper


def run_node(config: str, sink: Path, pipeline: str | None = None) -> None:
    """``dicomnode serve`` with wrappers around the pipeline, inference and the DICOM encoders."""
    import importlib

    import dicomnode.pipeline as pipeline_module

    def ct_uid(ct: Any, *_: Any) -> str:
        return str(ct.meta.get("SeriesInstanceUID", ""))

    pipeline_module.run_pipeline = _timed(pipeline_module.run_pipeline, "pipeline", sink,
                                          lambda job, *_: job.series_instance_uid)
    pipeline_module._save = _timed(pipeline_module._save, "encoding", sink, lambda *_: "")  # output writes
    wrapped = (("seg.infer", "segment", "inference"), ("reporting.seg", "build_seg", "encoding"),
               ("reporting.sr", "build_measurement_sr", "encoding"),
               ("reporting.summary", "build_summary", "encoding"),
               ("reporting.followup_sr", "build_followup_sr", "encoding"))
    for module, name, phase in wrapped:
        try:
            mod = importlib.import_module(module)
            setattr(mod, name, _timed(getattr(mod, name), phase, sink, ct_uid))
        except (ImportError, AttributeError) as exc:
            print(f"benchmark: cannot time {module}.{name}: {exc}", flush=True)
    args = ["serve", "--config", config]
    if pipeline:  # a stand-in (module:function) to check the plumbing without the science
        mod_name, _, fn = pipeline.partition(":")
        mod = importlib.import_module(mod_name)
        setattr(mod, fn, _timed(getattr(mod, fn), "pipeline", sink, lambda job, *_: job.series_instance_uid))
        args += ["--pipeline", pipeline]
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


def _spans(sink: Path, series_uid: str, phase: str) -> list[tuple[float, float]]:
    if not sink.exists():
        return []
    out = []
    for line in sink.read_text().splitlines():
        rec = json.loads(line)
        if rec["phase"] == phase and rec["series"] in (series_uid, ""):
            out.append((rec["start"], rec["end"]))
    return out


def one_run(workdir: Path, spacing: tuple[float, float, float], device: str, seed: int,
            pipeline: str | None = None, model: Path | None = None) -> dict[str, float]:
    from dicomnode.sop import is_ct
    from seg.phantom import PhantomOptions, make_phantom, write_phantom

    workdir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    ph = make_phantom(PhantomOptions(seed=seed, spacing_mm=spacing, patient_id=f"BENCH{seed}"))
    folder = Path(write_phantom(ph, workdir / "phantom")) / "dicom"
    n_files = len(list(folder.glob("*.dcm")))
    print(f"  phantom {ph.ct.array.shape} at {spacing} mm: {n_files} slices ({time.time() - t:.1f} s)")
    series_uid, study_uid = str(ph.meta["SeriesInstanceUID"]), str(ph.meta["StudyInstanceUID"])

    node_port = free_port()
    orthanc = OrthancServer(workdir / "orthanc", node_port=node_port, stable_age=2)
    storage = workdir / "node"
    config = workdir / "node.toml"
    write_toml(config, {
        "ae_title": "THIGHNODE", "host": "127.0.0.1", "port": node_port, "storage_dir": str(storage),
        "model_path": str(model.resolve()) if model else None, "stable_seconds": 1,
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
        "worker": {"device": device}, "send": {"initial_backoff_seconds": 1},
        "pairing": {"retrieve_priors": False},
    })
    sink = workdir / "timings.jsonl"
    node = None
    try:
        orthanc.start()
        with (workdir / "node.log").open("ab") as log:
            cmd = [sys.executable, __file__, "_node", str(config), str(sink)]
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
        pipe = _spans(sink, series_uid, "pipeline")
        inference = sum(b - a for a, b in _spans(sink, series_uid, "inference"))
        pipe_start, pipe_end = pipe[-1]
        encoding = sum(b - a for a, b in _spans(sink, series_uid, "encoding") if pipe_start <= a <= pipe_end)
        end = sent or done_seen  # C-STORE success from Orthanc (SyncStorageArea: on disk)
        parts = {
            "receive": ser["last_received_at"] - (event or ser["first_received_at"]),
            "stable wait": job["complete_at"] - ser["last_received_at"],
            "queue wait": job["started_at"] - job["complete_at"],
            "load/measure": (pipe_end - pipe_start) - inference - encoding,
            "inference": inference,
            "encoding": encoding,
            "send": end - pipe_end,
        }
        parts["total"] = end - (event or ser["first_received_at"])
        parts["instances"] = float(n_files)
        parts["outputs"] = float(n_out)
        parts["event_from_log"] = float(event is not None)
        return parts
    finally:
        if node is not None and node.poll() is None:
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        orthanc.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_node":
        run_node(argv[1], Path(argv[2]), argv[3] if len(argv) > 3 else None)
        return 0
    ap = argparse.ArgumentParser(description="Orthanc stable series → last output stored in Orthanc.")
    ap.add_argument("--spacing", default="1.5,1.5,1.5", help="phantom voxel size col,row,slice mm")
    ap.add_argument("--runs", type=int, default=1)
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
    results = []
    base = args.keep or Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}")
        results.append(one_run(base / f"run{run}", spacing, args.device, args.seed + run,  # type: ignore[arg-type]
                               args.pipeline, args.model))
        r = results[-1]
        if not r["event_from_log"]:
            print("  (no routing log line found; 'receive' counts from the first instance at the node)")
    keys = ["receive", "stable wait", "queue wait", "load/measure", "inference", "encoding", "send", "total"]
    print(f"\n{'phase':14s}" + "".join(f"{'run ' + str(i + 1):>10s}" for i in range(len(results))))
    for k in keys:
        print(f"{k:14s}" + "".join(f"{r[k]:10.2f}" for r in results) + "  s")
    print(f"{'instances':14s}" + "".join(f"{int(r['instances']):10d}" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
