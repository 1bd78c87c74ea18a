"""Receive throughput: dcmtk storescu → dcmtk storescp vs Orthanc vs ``dicomnode serve`` (loopback).

Why: the node sits in a PACS routing path and must not be the slow hop. Each run sends the same
synthetic CT series (default 300 slices of 512×512, uncompressed) over one association with dcmtk
``storescu``; runs are interleaved across targets and every target starts fresh for each run (empty
storage, so Orthanc cannot skip duplicates and nobody overwrites). The series is split over each
number of concurrent associations in ``--associations`` (default 1, 2 and 4). Every dcmtk/Orthanc
process runs with ``TCP_NODELAY=1`` (Debian builds stall ~45 ms per instance on delayed ACKs
otherwise). Targets:
  storescp  dcmtk storescp writing files (no fsync): an upper bound for a C++ SCP;
  orthanc   /usr/sbin/Orthanc, default SyncStorageArea=true, SQLite index, no plugins;
  node      ``dicomnode serve --no-worker``: temp file, rename, one syncfs (Linux >= 5.8; else fsync +
            folder fsync), SQLite row, then success,
            ``receive_processes = 1`` (one process, pynetdicom threads);
  node-pN   the same with ``receive_processes = N`` (one per N in ``--processes``; see receive_pool.py).
At the end it prints each node's ratios to Orthanc and storescp and checks them against issue #14's
targets (≥ 1.5 × Orthanc with 1 and with 4 associations, ≥ 0.4 × storescp with 1).

Usage: ``.venv/bin/python benchmarks/receive.py [--runs 3] [--slices 300] [--size 512]
[--associations 1,2,4] [--processes 2] [--baseline /tmp/old]`` (``--processes ""``: no node-pN;
``--baseline``: also the node of another checkout, as node-base).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dicomnode.external import ORTHANC_FALLBACK, orthanc_binary, require_dcmtk_tool
from dicomnode.harness.net import free_port
from dicomnode.harness.series import write_big_series

REPO = Path(__file__).resolve().parents[1]

ORTHANC = orthanc_binary() or ORTHANC_FALLBACK
ENV = {**os.environ, "TCP_NODELAY": "1"}


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


class Target:
    """A freshly started receiver in its own temp folder; ``count()`` says how many instances it holds."""

    name = ""
    aet = "ANY"

    def __init__(self, root: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=root))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class StoreSCPTarget(Target):
    name = "storescp"

    def start(self) -> None:
        out = self.root / "out"
        out.mkdir()
        storescp = require_dcmtk_tool("storescp")  # dcmtk's, not pynetdicom's script of the same name
        self.proc = subprocess.Popen([storescp, "-od", str(out), "+xa", str(self.port)], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def count(self) -> int:
        return sum(1 for _ in (self.root / "out").iterdir())


class OrthancTarget(Target):
    name = "orthanc"
    aet = "ORTHANC"

    def start(self) -> None:
        self.http = free_port()
        cfg = {
            "Name": f"bench-{self.port}", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "DicomAet": self.aet, "DicomPort": self.port,
            "HttpPort": self.http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "Plugins": [], "LuaScripts": [],
        }  # SyncStorageArea left at its default (true)
        (self.root / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], env=ENV, cwd=self.root,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as r:
            return int(json.load(r)["CountInstances"])


class NodeTarget(Target):
    name = "node"
    aet = "THIGHNODE"
    processes = 1
    source = REPO  # the checkout whose dicomnode runs (another one for node-base)

    def start(self) -> None:
        cfg = self.root / "node.toml"
        cfg.write_text(f'ae_title = "{self.aet}"\nhost = "127.0.0.1"\nport = {self.port}\n'
                       f'storage_dir = "{self.root / "var"}"\nstable_seconds = 600\nlog_level = "WARNING"\n'
                       + (f"receive_processes = {self.processes}\n" if self.processes != 1 else ""))
        env = {k: v for k, v in ENV.items() if not k.startswith("DICOMNODE_")}
        env["PYTHONPATH"] = str(self.source)
        with (self.root / "node.log").open("wb") as log:  # WARNING and above: read when a send fails
            self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                                          str(cfg), "--no-worker"], env=env, cwd=self.source, stdout=log,
                                         stderr=log)
        wait_port(self.port, self.proc)

    def count(self) -> int:
        con = sqlite3.connect(self.root / "var" / "index.sqlite")
        try:
            return int(con.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        finally:
            con.close()


def node_target(processes: int) -> type[NodeTarget]:
    """The node with ``receive_processes = processes`` (named node-pN)."""
    return type(f"NodeP{processes}", (NodeTarget,), {"name": f"node-p{processes}", "processes": processes})


def baseline_target(source: Path) -> type[NodeTarget]:
    """The node of another checkout (e.g. ``git worktree add /tmp/old <commit>``), named node-base, so
    that a change is measured against the code before it in the same run."""
    return type("NodeBase", (NodeTarget,), {"name": "node-base", "source": source.resolve()})


TARGETS: dict[str, Callable[[Path], Target]] = {"storescp": StoreSCPTarget, "orthanc": OrthancTarget,
                                                "node": NodeTarget}
GOALS = ((1, "orthanc", 1.5), (4, "orthanc", 1.5), (1, "storescp", 0.4))  # issue #14: assocs, peer, ratio


def durable_write_floor(root: Path, size_bytes: int, n: int = 100) -> tuple[float, str]:
    """Seconds per instance of the node's own durable write (``Store.write``: temp file, rename, one
    syncfs, or fsync + folder fsync where syncfs is not used) of an instance this size, on the
    benchmark's disk, and which of the two it was: what no SCP keeping the node's guarantee can go
    below, per association, however fast its protocol code."""
    from dicomnode.db import Database
    from dicomnode.storage.store import InstanceInfo, Store, encode_file_meta

    store = Store(root / "floor", Database(root / "floor" / "index.sqlite"))
    data = os.urandom(size_bytes)
    try:
        t = time.perf_counter()
        for i in range(n):
            info = InstanceInfo(sop_uid=f"1.2.3.{i}", sop_class="1.2.840.10008.5.1.4.1.1.2",
                                transfer_syntax="1.2.840.10008.1.2.1", study_uid="1.2.3",
                                series_uid="1.2.3.4")
            store.write(info, encode_file_meta(info), data)
        mode = ("temp file, rename, one syncfs" if store.one_flush
                else "temp file, fsync, rename, folder fsync")
        return (time.perf_counter() - t) / n, mode
    finally:
        store.close()
        shutil.rmtree(root / "floor", ignore_errors=True)


def report_ratios(summary: dict[str, float], nodes: list[str], associations: list[int]) -> None:
    """Each node's median rate over Orthanc's and storescp's in the same run, and the targets."""
    for node in nodes:
        for assocs in associations:
            rate = summary.get(f"{node}/{assocs}")
            parts = [f"{node}/{other} = {rate / summary[f'{other}/{assocs}']:.2f}"
                     for other in ("orthanc", "storescp", "node-base")
                     if rate and f"{other}/{assocs}" in summary and other != node]
            if parts:
                print(f"ratios, {assocs} association(s): " + ", ".join(parts))
        for assocs, peer, goal in GOALS:
            rate, base = summary.get(f"{node}/{assocs}"), summary.get(f"{peer}/{assocs}")
            if rate and base:
                ratio = rate / base
                verdict = "met" if ratio >= goal else f"NOT met (short by {goal - ratio:.2f})"
                print(f"target {node} ≥ {goal} × {peer} with {assocs}: {ratio:.2f} {verdict}")


def send(target: Target, files: list[Path], associations: int) -> float:
    """Seconds to C-STORE all files over ``associations`` concurrent storescu processes."""
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    storescu = require_dcmtk_tool("storescu")  # dcmtk's, not pynetdicom's script of the same name
    procs = [subprocess.Popen([storescu, "-aec", target.aet, "127.0.0.1", str(target.port), *map(str, c)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in chunks]
    output = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - t0
    bad = [f"exit {p.returncode}: " + out.decode(errors="replace")[-300:]
           for p, out in zip(procs, output, strict=True) if p.returncode]
    if bad:
        log = target.root / "node.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"storescu to {target.name} failed: {bad[0]}\n{tail}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--associations", default="1,2,4", help="comma-separated association counts")
    ap.add_argument("--processes", default="2", help="receive_processes of the extra node targets node-pN")
    ap.add_argument("--targets", default="storescp,orthanc,node", help="node-pN added from --processes")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--baseline", type=Path, help="also run the node of this checkout (target node-base), "
                    "e.g. a git worktree of the commit before a change")
    ap.add_argument("--dir", type=Path, help="where the targets store (default: the system temp folder); "
                    "/dev/shm makes fsync free and shows what the protocol code alone costs")
    args = ap.parse_args()
    names = [n for n in args.targets.split(",") if n]
    for n in (int(p) for p in args.processes.split(",") if p):
        TARGETS[f"node-p{n}"] = node_target(n)
        names.append(f"node-p{n}")
    if args.baseline is not None:
        TARGETS["node-base"] = baseline_target(args.baseline)
        names.append("node-base")
    associations = [int(a) for a in args.associations.split(",") if a]
    if "orthanc" in names and not Path(ORTHANC).is_file():
        print(f"skipping orthanc: {ORTHANC} not found")
        names.remove("orthanc")
    with tempfile.TemporaryDirectory(prefix="bench-receive-", dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        files = write_big_series(root / "series", n=args.slices, size=args.size).files
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances, {mb:.0f} MB, written in {time.perf_counter() - t:.1f} s; "
              f"{args.runs} interleaved runs per target; loadavg {os.getloadavg()[0]:.1f}")
        rates: dict[tuple[str, int], list[float]] = {}
        for assocs in associations:
            for run in range(args.runs):
                for name in names:
                    target = TARGETS[name](root)
                    try:
                        target.start()
                        elapsed = send(target, files, assocs)
                        held = target.count()
                    finally:
                        target.stop()
                    if held != len(files):
                        raise RuntimeError(f"{name} holds {held} of {len(files)} instances")
                    rate = len(files) / elapsed
                    rates.setdefault((name, assocs), []).append(rate)
                    print(f"  run {run + 1} {name:9s} {assocs} assoc: {rate:7.1f} instances/s", flush=True)
        print(f"\n{'target':10s} {'assocs':>6s} {'median/s':>9s}  runs")
        for (name, assocs), values in rates.items():
            print(f"{name:10s} {assocs:6d} {statistics.median(values):9.1f}  "
                  + " ".join(f"{v:.0f}" for v in values))
        summary = {f"{n}/{a}": statistics.median(v) for (n, a), v in rates.items()}
        floor, flush = durable_write_floor(root, int(mb * 1e6 / len(files)))
        print(f"durable write alone (Store.write, {flush}), one at a time: {floor * 1e3:.2f} ms "
              f"per instance = at most {1 / floor:.0f} instances/s for one association")
        report_ratios(summary, [n for n in names if n.startswith("node")], associations)
        if args.json:
            runs = {f"{n}/{a}": v for (n, a), v in rates.items()}
            args.json.write_text(json.dumps({"median_instances_per_s": summary, "runs": runs,
                                             "durable_write_s": floor}, indent=2))


if __name__ == "__main__":
    main()
