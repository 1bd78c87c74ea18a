"""Receive throughput: dcmtk storescu → dcmtk storescp vs Orthanc vs ``dicomnode serve`` (loopback).

Why: the node sits in a PACS routing path and must not be the slow hop. Each run sends the same
synthetic CT series (default 300 slices of 512×512, uncompressed) over one association with dcmtk
``storescu``; runs are interleaved across targets and every target starts fresh for each run (empty
storage, so Orthanc cannot skip duplicates and nobody overwrites). Then the series is split over
N concurrent associations. Every dcmtk/Orthanc process runs with ``TCP_NODELAY=1`` (Debian builds
stall ~45 ms per instance on delayed ACKs otherwise). Targets:
  storescp  dcmtk storescp writing files (no fsync): an upper bound for a C++ SCP;
  orthanc   /usr/sbin/Orthanc, default SyncStorageArea=true, SQLite index, no plugins;
  node      ``dicomnode serve --no-worker``: temp file + fsync + rename + SQLite row before success.

Usage: ``.venv/bin/python benchmarks/receive.py [--runs 3] [--slices 300] [--size 512] [--concurrent 4]``
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

    def start(self) -> None:
        cfg = self.root / "node.toml"
        cfg.write_text(f'ae_title = "{self.aet}"\nhost = "127.0.0.1"\nport = {self.port}\n'
                       f'storage_dir = "{self.root / "var"}"\nstable_seconds = 600\nlog_level = "WARNING"\n')
        env = {k: v for k, v in ENV.items() if not k.startswith("DICOMNODE_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(cfg),
                                      "--no-worker"], env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def count(self) -> int:
        con = sqlite3.connect(self.root / "var" / "index.sqlite")
        try:
            return int(con.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        finally:
            con.close()


TARGETS: dict[str, Callable[[Path], Target]] = {"storescp": StoreSCPTarget, "orthanc": OrthancTarget,
                                                "node": NodeTarget}


def send(target: Target, files: list[Path], associations: int) -> float:
    """Seconds to C-STORE all files over ``associations`` concurrent storescu processes."""
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    storescu = require_dcmtk_tool("storescu")  # dcmtk's, not pynetdicom's script of the same name
    procs = [subprocess.Popen([storescu, "-aec", target.aet, "127.0.0.1", str(target.port), *map(str, c)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - t0
    bad = [e.decode(errors="replace")[-300:] for p, e in zip(procs, errors, strict=True) if p.returncode]
    if bad:
        raise RuntimeError(f"storescu to {target.name} failed: {bad[0]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--targets", default="storescp,orthanc,node")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    names = [n for n in args.targets.split(",") if n]
    if "orthanc" in names and not Path(ORTHANC).is_file():
        print(f"skipping orthanc: {ORTHANC} not found")
        names.remove("orthanc")
    with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        files = write_big_series(root / "series", n=args.slices, size=args.size).files
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances, {mb:.0f} MB, written in {time.perf_counter() - t:.1f} s; "
              f"{args.runs} interleaved runs per target; loadavg {os.getloadavg()[0]:.1f}")
        rates: dict[tuple[str, int], list[float]] = {}
        for assocs in (1, args.concurrent):
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
                    print(f"  run {run + 1} {name:9s} {assocs} assoc: {rate:7.1f} instances/s")
        print(f"\n{'target':10s} {'assocs':>6s} {'median/s':>9s}  runs")
        for (name, assocs), values in rates.items():
            print(f"{name:10s} {assocs:6d} {statistics.median(values):9.1f}  "
                  + " ".join(f"{v:.0f}" for v in values))
        summary = {f"{n}/{a}": statistics.median(v) for (n, a), v in rates.items()}
        for assocs in (1, args.concurrent):
            node = summary.get(f"node/{assocs}")
            parts = [f"node/{other} = {node / summary[f'{other}/{assocs}']:.2f}"
                     for other in ("orthanc", "storescp") if node and f"{other}/{assocs}" in summary]
            if parts:
                print(f"ratios, {assocs} association(s): " + ", ".join(parts))
        if args.json:
            runs = {f"{n}/{a}": v for (n, a), v in rates.items()}
            args.json.write_text(json.dumps({"median_instances_per_s": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
