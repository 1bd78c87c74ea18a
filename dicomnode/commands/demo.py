"""``dicomnode demo``: the main job end to end on embedded defaults, offline, CPU only.

Why a command and not a script: it is what ``make demo`` runs on a fresh machine, and it exercises the
same pieces a hospital deploys: ``dicomnode serve`` as its own process (SQLite, local storage, the
shipped demo model), results sent back over DICOM to a PACS. When Debian's Orthanc is installed it
plays the PACS with the shipped ``deploy/orthanc`` configuration and routing script (the "scanner"
stores into Orthanc, Orthanc routes to the node); otherwise a local pynetdicom store SCP receives the
results and the "scanner" sends straight to the node.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from dicomnode.commands.common import cell, echo_problems, model_lines, spacing_option
from dicomnode.commands.demo_ports import DemoPorts, PortError, claim_ports
from dicomnode.harness.net import stop_process, wait_for
from dicomnode.harness.node import own_config_env
from dicomnode.harness.scu import echo, send_series
from dicomnode.harness.tomlfile import write_toml
from dicomnode.processing.pipeline import results_root
from seg.dates import as_date
from seg.records import ChangeRecord, EvaluationTargets, LeftRight, VolumeRecord, other_side
from seg.terminal import COLUMNS

SCANNER_AET = "CTSCANNER"
NODE_AET = "THIGHNODE"
PACS_AET = "ORTHANC"
# Post-operative change built into the follow-up phantom: volume factors on the operated side,
# roughly the pattern the paper reports (gluteal and anterior muscles lose most).
FOLLOWUP_ATROPHY = {
    "gluteus_maximus": 0.85, "gluteus_medius": 0.80, "gluteus_minimus": 0.80, "tensor_fasciae_latae": 0.85,
    "vastus_lateralis": 0.85, "vastus_intermedius": 0.88, "rectus_femoris": 0.90, "iliopsoas": 0.85,
    "adductor_magnus": 0.92,
}
OPERATED: LeftRight = "left"  # the follow-up phantom's implant and atrophy side, the fractured side


class PacsKind(StrEnum):
    """Which PACS the demo runs: a closed choice, so ``--pacs orthnac`` is refused with the options."""

    AUTO = "auto"  # Orthanc when installed, else the local store SCP
    ORTHANC = "orthanc"
    LOCAL = "local"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


# ------------------------------------------------------------------------------------------------
# The PACS: Orthanc (shipped config + routing script) or a local store SCP
# ------------------------------------------------------------------------------------------------
@dataclass
class Received:
    """One object the PACS holds for a study."""

    study_uid: str
    sop_class: str
    sop_uid: str
    where: str  # a file path or an Orthanc URL


class LocalPacs:
    """A pynetdicom storage SCP that writes what the node sends under ``folder`` (no Orthanc needed)."""

    name = "local store SCP"

    def __init__(self, folder: Path, port: int) -> None:
        from dicomnode.harness.capture import CapturingSCP
        from dicomnode.network.scp import transfer_syntaxes
        from dicomnode.network.sop import SEG_CLASSES

        self.folder = folder
        self.aet = PACS_AET
        self._objects: list[Received] = []
        # the compressed syntaxes too: the node sends its SEG in RLE (or JPEG-LS), as it is stored
        self._scp = CapturingSCP(self.aet, port, on_dataset=self._save, keep=False,
                                 extra_contexts=tuple(SEG_CLASSES), transfer_syntaxes=transfer_syntaxes())
        self.dicom_port = self._scp.port
        self.labels: dict[str, str] = {}  # StudyInstanceUID -> folder name (pre-op, follow-up)

    def _save(self, ds: Any) -> None:
        """Write one received object under its study's folder; a re-sent SOP Instance UID replaces it."""
        study = str(ds.StudyInstanceUID)
        obj = Received(study, str(ds.SOPClassUID), str(ds.SOPInstanceUID), "")
        folder = self.folder / self.labels.get(study, study)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_kind(obj)}_{obj.sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        obj.where = str(path)
        self._objects = [o for o in self._objects if o.sop_uid != obj.sop_uid] + [obj]

    def start(self) -> None:
        self._scp.start()

    def objects(self, study_uid: str) -> list[Received]:
        with self._scp.lock:
            return [o for o in self._objects if o.study_uid == study_uid]

    def stop(self) -> None:
        self._scp.stop()


class OrthancPacs:
    """Orthanc with the shipped configuration and routing script (the harness's), on the demo's loopback
    ports."""

    name = "Orthanc"

    def __init__(self, folder: Path, ports: DemoPorts) -> None:
        from dicomnode.harness.orthanc import OrthancServer

        self.server = OrthancServer(folder, aet=PACS_AET, node_aet=NODE_AET, node_port=ports.node,
                                    dicom_port=ports.pacs, http_port=ports.orthanc_http,
                                    extra={"Name": "dicomnode-demo"})
        self.aet = PACS_AET
        self.dicom_port = self.server.dicom_port
        self.config = self.server.config_path

    @staticmethod
    def available() -> bool:
        from dicomnode.harness.orthanc import have_orthanc

        return have_orthanc()

    def start(self) -> None:
        try:
            self.server.start()
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(f"Orthanc did not start: {exc}; see {self.server.log_path}") from exc

    def objects(self, study_uid: str) -> list[Received]:
        from dicomnode.network.sop import is_ct

        server, out = self.server, []
        for inst in server.instances_of_study(study_uid):
            iid = inst["ID"]
            sop_class = server.get_bytes(f"/instances/{iid}/metadata/SopClassUid").decode()
            if is_ct(sop_class):  # the CT itself
                continue
            out.append(Received(study_uid, sop_class, inst["MainDicomTags"].get("SOPInstanceUID", iid),
                                f"{server.url}/instances/{iid}/file"))
        return out

    def fetch(self, obj: Received, folder: Path) -> Path:
        """A local copy of a stored object (Orthanc runs only as long as the demo)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_kind(obj)}_{obj.sop_uid}.dcm"
        with urllib.request.urlopen(obj.where, timeout=60) as resp:
            path.write_bytes(resp.read())
        return path

    def stop(self) -> None:
        self.server.stop()


# ------------------------------------------------------------------------------------------------
# The node, the scanner, the phantoms
# ------------------------------------------------------------------------------------------------
def write_node_config(path: Path, *, port: int, storage: Path, pacs_port: int,
                      model: Path | None = None) -> Path:
    """A node configuration for the demo: embedded defaults, quick series completion and retries."""
    return write_toml(path, {
        "ae_title": NODE_AET, "host": "127.0.0.1", "port": port,
        "model_path": model.resolve().as_posix() if model else None,
        "storage_dir": storage.as_posix(), "stable_seconds": 2, "log_level": "INFO",
        "pacs": {"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs_port},
        "worker": {"device": "cpu"},
        "send": {"attempts": 5, "initial_backoff_seconds": 2, "max_backoff_seconds": 10},
        "pairing": {"retrieve_priors": False},
    })


def write_registry(path: Path) -> Path:
    """The demo patient's clinical row: registry height, fracture on the left, surgery two days in."""
    path.write_text("patient_id,height_m,sex,fracture_type,fractured_side,surgery_date,koval_grade\n"
                    f"DEMO-0001,1.62,F,ITF,{OPERATED},20240107,2\n")
    return path


def node_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)]


def shown(path: Path) -> str:
    """A path as the demo prints it: relative to the working folder when inside it (what the user typed,
    and short enough for 80 columns), else absolute."""
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def cli_command() -> str:
    """``dicomnode`` as the user can run it again: ``make demo`` runs ``.venv/bin/dicomnode`` without
    putting it on PATH, so a bare ``dicomnode`` in a printed command would not be found.

    The running console script (relative to the working folder when inside it), its bare name only
    when PATH finds that same file; under ``python -m`` the interpreter and the module.
    """
    script = Path(sys.argv[0])
    if script.suffix == ".py" or not script.name.startswith("dicomnode"):
        return f"{_runnable(Path(sys.executable))} -m dicomnode.cli"
    found = shutil.which(script.name)
    if found and Path(found).resolve() == script.resolve():
        return script.name
    return _runnable(script.absolute())


def _runnable(path: Path) -> str:
    """``shown`` as a shell word: quoted, and with ``./`` where the shell would look the name up on PATH."""
    text = shown(path)
    return shlex.quote(text if "/" in text else f"./{text}")


def fits(*parts: str) -> bool:
    """Whether the parts, joined by spaces, fit one line (every line the demo prints fits; a path or
    URL that cannot goes on a line of its own, unfolded)."""
    return len(" ".join(parts)) <= COLUMNS


@dataclass
class DemoStudy:
    label: str
    folder: Path
    study_uid: str
    series_uid: str
    truth: VolumeRecord
    n_files: int
    implant: bool = False  # the phantom has one: the change's caveat holds whatever the node detected


def make_patient(out: Path, spacing: tuple[float, float, float], seed: int) -> list[DemoStudy]:
    """A phantom patient: pre-operative CT and a follow-up with atrophy and a nail on the left."""
    from seg.phantom import PhantomOptions, make_phantom, write_phantom

    common = dict(seed=seed, spacing_mm=spacing, patient_id="DEMO-0001", patient_name="Demo^Patient",
                  sex="F", height_m=1.62)
    variants = [
        ("pre-op", PhantomOptions(**common, study_date="20240105", study_time="101500")),
        ("follow-up", PhantomOptions(**common, study_date="20240504", study_time="094500", postop=True,
                                     implant_side=OPERATED, atrophy=FOLLOWUP_ATROPHY, fat_infiltration=0.15,
                                     series_number=2)),
    ]
    studies = []
    for label, opts in variants:
        ph = make_phantom(opts)
        folder = write_phantom(ph, out / label)
        dicom = Path(folder) / "dicom"
        truth = VolumeRecord.load(Path(folder) / "truth" / "volumes.json")
        studies.append(DemoStudy(label, dicom, str(ph.header.study_instance_uid),
                                 str(ph.header.series_instance_uid), truth, len(list(dicom.glob("*.dcm"))),
                                 implant=bool(opts.postop and opts.implant_side)))
    return studies


def node_jobs(config: Path) -> list[dict]:
    """The node's job table (``dicomnode jobs --json``); empty when it cannot be read yet."""
    try:
        run = subprocess.run(node_command(config, "jobs", "--json"), capture_output=True, text=True,
                             timeout=60, env=own_config_env())
        data = json.loads(run.stdout) if run.returncode == 0 and run.stdout.strip() else []
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return []
    if isinstance(data, dict):
        data = data.get("jobs", [])
    return [j for j in data if isinstance(j, dict)]


def _job_problem(jobs: list[dict], series_uid: str) -> str | None:
    """Why the series' job ended without results (a row of ``jobs --json``), or None."""
    for job in jobs:
        if job.get("series_instance_uid") == series_uid and job.get("state") in ("rejected", "failed"):
            return f"job {job.get('id', '?')} {job['state']}: {job.get('reason', '')}"
    return None


def results_ready(objects: list[Received], followup: bool) -> bool:
    kinds: dict[str, int] = defaultdict(int)
    for o in objects:
        kinds[_kind(o)] += 1
    enough_sr = kinds["SR"] >= (2 if followup else 1)
    return kinds["SEG"] >= 1 and enough_sr and kinds["summary"] >= 1


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def volume_table(title: str, measured: VolumeRecord, truth: VolumeRecord,
                 dice: dict[tuple[str, str], float]) -> str:
    """One study's 21 muscles, each side: measured cm³, truth cm³ and Dice, then the mean Dice.

    Plain text under 80 columns, muscles by their display names (the class table's).
    """
    from seg.labels import ANALYSED_MUSCLES, PAPER_ORDER, by_name

    mp, tp = measured.by_name(), truth.by_name()
    head = f"{'muscle':<21}{'L cm³':>9}{'truth':>9}{'Dice':>7}  {'R cm³':>9}{'truth':>9}{'Dice':>7}"
    lines = [title, head, "-" * len(head)]
    scores = []
    for name in PAPER_ORDER:
        m, t = mp.get(name), tp.get(name)
        row = f"{by_name(name).display_name:<21}"
        for side in ("left", "right"):
            d = dice.get((name, side))
            if d is not None:
                scores.append(d)
            mv = m.side_volume(side) if m else None
            tv = t.side_volume(side) if t else None
            row += (f"{cell(mv, '9.1f'):>9}{cell(tv, '9.1f'):>9}"
                    f"{cell(d, '7.3f'):>7}" + ("  " if side == "left" else ""))
        lines.append(row)
    mean = sum(scores) / len(scores) if scores else None
    lines.append(f"mean Dice over the {len(ANALYSED_MUSCLES)} muscles, both sides: {cell(mean, '.3f')}")
    return "\n".join(lines)


def change_table(change: ChangeRecord, atrophy: dict[str, float], operated: str) -> str:
    """Per-muscle signed change (%) on each side against the phantom's true atrophy (operated side).

    Empty where the change record states none (baseline below the reporting floor).
    """
    from seg.labels import PAPER_ORDER, by_name

    by_key = {(s.name, s.side): s for s in change.structures}
    head = f"{'muscle':<21}{'L change %':>12}{'R change %':>12}{'truth %':>10}"
    lines = [head, "-" * len(head)]
    for name in PAPER_ORDER:
        left, right = by_key.get((name, "left")), by_key.get((name, "right"))
        if not left or not right:
            continue
        factor = atrophy.get(name)
        truth = f"{-(1 - factor) * 100:+.0f} {operated[0].upper()}" if factor else "0"
        lines.append(f"{by_name(name).display_name:<21}{cell(left.change_pct, '+12.1f'):>12}"
                     f"{cell(right.change_pct, '+12.1f'):>12}{truth:>10}")
    return "\n".join(lines)


def side_errors(change: ChangeRecord, pre_truth: VolumeRecord, post_truth: VolumeRecord,
                side: LeftRight) -> list[tuple[str, float, float]]:
    """``(display name, measured %, true %)`` for each muscle side the change states a figure for.

    True: the phantoms' own label volumes, so a muscle the atrophy did not touch is true 0 %.
    """
    from seg.labels import PAPER_ORDER, by_name

    measured = {s.name: s.change_pct for s in change.structures if s.side == side}
    pre, post = pre_truth.by_name(), post_truth.by_name()
    out = []
    for name in PAPER_ORDER:
        before = pre[name].side_volume(side) if name in pre else None
        after = post[name].side_volume(side) if name in post else None
        if measured.get(name) is None or not before or after is None:
            continue
        out.append((by_name(name).display_name, measured[name], (after - before) / before * 100))
    return out


def error_lines(label: str, errors: list[tuple[str, float, float]], tolerance: float) -> list[str]:
    """One side's agreement with the truth: how many within ``tolerance`` points, and the worst."""
    if not errors:
        return [f"{label}: no muscle with a change figure"]
    within = sum(abs(m - t) <= tolerance for _, m, t in errors)
    name, m, t = max(errors, key=lambda e: abs(e[1] - e[2]))
    return [f"{label}: {within} of {len(errors)} muscles within {tolerance:g} pp of the truth (the target)",
            f"  worst: {name} {cell(m, '+.1f')} % vs {cell(t, '+.1f')} % true, {abs(m - t):.1f} pp off"]


def total_line(change: ChangeRecord, pre_truth: VolumeRecord, post_truth: VolumeRecord) -> str:
    """The analysed muscles together (both sides), as the node measured and as the phantoms hold them."""
    from seg.labels import ANALYSED_MUSCLES

    def total(rec: VolumeRecord) -> float:
        return sum(s.volume_cm3 for s in rec.structures if s.name in ANALYSED_MUSCLES)

    t, before = change.total_analysed_muscles, total(pre_truth)
    true = (total(post_truth) - before) / before * 100 if before else None
    return (f"total, {t.structures} analysed muscles, both sides: {cell(t.change_pct, '+.1f')} % measured, "
            f"{cell(true, '+.1f')} % true")


def change_summary(change: ChangeRecord, pre_truth: VolumeRecord, post_truth: VolumeRecord) -> list[str]:
    """Under the change table: how far the measured change is from the truth, in figures, so that a
    muscle 40 points off is not left for the reader to spot."""
    tolerance = EvaluationTargets().atrophy_loss_error_pp  # the project's target for the loss
    other = other_side(OPERATED)
    lines = error_lines(f"{OPERATED} (operated)", side_errors(change, pre_truth, post_truth, OPERATED),
                        tolerance)
    lines += error_lines(f"{other} (not operated)", side_errors(change, pre_truth, post_truth, other),
                         tolerance)
    return [*lines, total_line(change, pre_truth, post_truth)]


def implant_caveat(side: str) -> str:
    """Why a muscle beside the nail can be far off: metal streaks (docs/models.md has the figures)."""
    return f"metal ({side}): volumes next to the implant are less reliable; see docs/models.md"


def near_metal_lines(volumes: VolumeRecord, width: int = COLUMNS) -> list[str]:
    """The analysed muscle sides the measurement flags next to the implant (the page's †), by name,
    wrapped to ``width``: which volumes the caveat is about; none without metal."""
    import textwrap

    from seg.labels import ANALYSED_MUSCLES, by_name

    names = [f"{by_name(s.name).display_name} {side}" for s in volumes.structures
             if s.name in ANALYSED_MUSCLES for side in ("left", "right") if s.near_metal(side)]
    if not names:
        return []
    return textwrap.wrap(f"next to it, the least reliable: {', '.join(names)}", width,
                         subsequent_indent="  ")


def interval_lines(change: ChangeRecord) -> list[str]:
    """The change's interval: the days between the two CTs, which is not the time since surgery (the
    pre-op CT is before it); that one from the registry's surgery date when pairing recorded it."""
    lines = [f"Change between the CTs: {cell(change.days_between, 'd')} days apart, fractured side "
             f"{change.fractured_side or 'unknown'}"]
    surgery, followup = as_date(change.surgery_date), as_date(change.followup.study_date)
    if surgery is not None and followup is not None:
        lines.append(f"surgery on {surgery:%Y-%m-%d}, {(followup - surgery).days} days before the "
                     "follow-up CT")
    return lines


def _study_dice(study: DemoStudy, result_dir: Path) -> dict[tuple[str, str], float]:
    from seg.evaluate import dice_by_side
    from seg.io import load_nifti

    pred, truth = result_dir / "labels.nii.gz", study.folder.parent / "truth" / "labels.nii.gz"
    if not (pred.exists() and truth.exists()):
        return {}
    return dice_by_side(load_nifti(pred), load_nifti(truth))


def print_results(console: Any, pre: DemoStudy, post: DemoStudy, storage: Path) -> None:
    pre_dir, post_dir = results_root(storage) / pre.series_uid, results_root(storage) / post.series_uid
    measured = {}
    for study, folder in ((pre, pre_dir), (post, post_dir)):
        measured[study.label] = VolumeRecord.load(folder / "volumes.json")
        if study is pre:
            for line in model_lines(measured[study.label].model):
                console.print(line, style="yellow", highlight=False, markup=False)
            console.print()
        title = f"{study.label}: per-muscle volumes (node) against the phantom's truth"
        console.print(volume_table(title, measured[study.label], study.truth, _study_dice(study, folder)),
                      highlight=False, markup=False)
        console.print()

    changes = sorted(post_dir.glob("change-*.json"))
    if not changes:
        console.print("[yellow]no change record was produced (pairing did not pair the two studies)[/]")
        return
    change = ChangeRecord.load(changes[0])
    lines = [*interval_lines(change),
             "change % = (post - pre) / pre, negative for a loss; truth % = phantom atrophy"]
    console.print("\n".join(lines), highlight=False, markup=False)
    console.print(change_table(change, FOLLOWUP_ATROPHY, OPERATED), highlight=False, markup=False)
    console.print("\n".join(change_summary(change, pre.truth, post.truth)), highlight=False, markup=False)
    qa = measured[post.label].qa
    if qa.metal or post.implant:
        console.print(implant_caveat(qa.metal_where.side if qa.metal_where else OPERATED), style="yellow",
                      highlight=False, markup=False)
        for line in near_metal_lines(measured[post.label]):
            console.print(line, style="yellow", highlight=False, markup=False)


def print_outputs(console: Any, pacs: LocalPacs | OrthancPacs, studies: list[DemoStudy], out: Path,
                  storage: Path) -> None:
    """Where each study's results are: the PACS's objects (a local copy of each) and the node's files.

    A folder on a line of its own and file names under it, so that each fits 80 columns and is
    never folded (``soft_wrap``): a folded path cannot be copied.
    """
    def line(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    for study in studies:
        console.print(f"[bold]{study.label}[/] study {study.study_uid}", highlight=False)
        folder = out / "pacs" / study.label
        line(f"  from the PACS, in {shown(folder)}/")
        for obj in sorted(pacs.objects(study.study_uid), key=_kind):
            where = pacs.fetch(obj, folder) if isinstance(pacs, OrthancPacs) else Path(obj.where)
            line(f"    {_kind(obj):8s} {where.name}")
        line("  at the node: outputs/ (as sent), volumes.json, volumes.csv, labels.nii.gz in")
        line(f"    {shown(results_root(storage) / study.series_uid)}/")
    if isinstance(pacs, OrthancPacs):
        line(f"Orthanc's database: {shown(out / 'orthanc' / 'db')}")
        line(f"  to browse it later: Orthanc {shown(out / 'orthanc' / 'orthanc.json')}")


def print_step(console: Any, seconds: float, msg: str, detail: str = "") -> None:
    """A step after the time it took place; ``detail`` (a path, a command) after ``msg`` when both fit
    80 columns, else alone on the next line and never folded: a folded path cannot be copied."""
    head = f"{seconds:6.1f} s  "
    both = fits(head + msg, detail) if detail else True
    console.print(Text.assemble((head, "dim"), f"{msg} {detail}" if detail and both else msg), soft_wrap=True)
    if not both:
        console.print(" " * len(head) + detail, highlight=False, markup=False, soft_wrap=True)


def _kind(o: Received) -> str:
    """SEG, SR, summary or other: exact SOP classes (:mod:`dicomnode.network.sop`), never a UID prefix."""
    from dicomnode.network.sop import output_kind

    return output_kind(o.sop_class)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def _stop_serving(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _as_typed(value: object) -> str:
    """An option's value as a user would type it again: 600, not 600.0."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag(name: str) -> str:
    """A parameter's option as typed: ``node_port`` is ``--node-port``."""
    return "--" + name.replace("_", "-")


def again_with_view(cli: str, options: list[str]) -> str:
    """The command that runs this demo again, as it was asked for, and keeps the viewer open.

    Why the options: a bare ``demo --view`` after ``demo --out run2 --seed 3`` replaced the default
    folder with another patient's demo instead of showing the one just run.
    """
    return " ".join([cli, "demo", *map(shlex.quote, options), "--view"])


def show_in_viewer(console: Any, pacs: OrthancPacs, studies: list[DemoStudy], keep_open: bool,
                   again: str = "dicomnode demo --view", port: int | None = None) -> None:
    """Print the URL of each study in a browser viewer; with ``keep_open``, serve them until Ctrl-C.

    OHIF (npm ``@ohif/app``, served by the harness in front of Orthanc's DICOMweb) when set up, and
    always Orthanc's own Explorer (the viewer on ``port``, else a free one). Orthanc and the viewer
    live only as long as the demo, so without ``keep_open`` no URL is printed (it would be dead when
    read), only the command that keeps them.
    """
    from dicomnode.harness.viewer import ViewerServer, ohif_dist

    if not keep_open:  # Orthanc and the viewer end with the demo: URLs printed now would be dead
        console.print("  to look at both studies in OHIF and Orthanc Explorer (open until Ctrl-C), run")
        console.print(f"    {again}", highlight=False, markup=False, soft_wrap=True)
        return
    server = pacs.server
    viewer = ViewerServer(server.url, port=port).start() if ohif_dist() and server.has_dicomweb else None
    try:
        for study in studies:
            # one unbroken line per URL (soft_wrap): a folded URL cannot be copied or clicked
            if viewer is not None:
                console.print(f"  {study.label:9s} OHIF    {viewer.study_url(study.study_uid)}",
                              highlight=False, soft_wrap=True)
            console.print(f"  {study.label:9s} Orthanc {server.url}/app/explorer.html#study?uuid="
                          f"{server.study_id(study.study_uid)}", highlight=False, soft_wrap=True)
        if viewer is None:
            console.print("  (for OHIF, run bash scripts/setup.sh as root: viewer and Orthanc DICOMweb)")
        console.print("[bold]serving the viewer: press Ctrl-C to stop Orthanc, the viewer and the node[/]")
        previous = signal.signal(signal.SIGTERM, _stop_serving)  # `kill` stops as cleanly as Ctrl-C
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        if viewer is not None:
            viewer.stop()


@dataclass
class _DemoRun:
    """One demo's folder, node configuration and port, PACS and node process (the one owner of each,
    so that the steps below share them and the ``finally`` of :func:`run_demo` stops them)."""

    out: Path
    console: Any
    started: float  # time.monotonic() at the start: steps are printed against it
    ports: DemoPorts
    config: Path
    pacs: LocalPacs | OrthancPacs
    cli: str
    node: subprocess.Popen[bytes] | None = None

    def step(self, msg: str, detail: str = "") -> None:
        print_step(self.console, time.monotonic() - self.started, msg, detail)

    def check_node(self) -> None:
        """Stop waiting as soon as the node process has exited."""
        if self.node is not None and self.node.poll() is not None:
            raise DemoError(f"the node exited ({self.node.returncode}); see {self.out / 'node.log'}")


def uses_orthanc(kind: PacsKind) -> bool:
    """Whether the PACS is Orthanc: asked for, or (auto) installed; else the local store SCP."""
    if kind == PacsKind.ORTHANC and not OrthancPacs.available():
        raise DemoError("--pacs orthanc: Orthanc is not installed (apt-get install orthanc)")
    return kind == PacsKind.ORTHANC or (kind == PacsKind.AUTO and OrthancPacs.available())


def _make_pacs(kind: PacsKind, out: Path, ports: DemoPorts) -> LocalPacs | OrthancPacs:
    """Orthanc when asked for or (auto) installed, else the local store SCP; not started yet."""
    if uses_orthanc(kind):
        (out / "orthanc").mkdir()
        return OrthancPacs(out / "orthanc", ports)
    return LocalPacs(out / "pacs", ports.pacs)


def _make_studies(run: _DemoRun, spacing: tuple[float, float, float],
                  seed: int) -> tuple[DemoStudy, DemoStudy]:
    """The phantom patient's two studies, written under ``phantoms/``; the local PACS files by label."""
    run.step(f"generating the phantom patient (spacing {spacing[0]:g}×{spacing[1]:g}×{spacing[2]:g} mm)")
    pre, post = make_patient(run.out / "phantoms", spacing, seed)
    if isinstance(run.pacs, LocalPacs):
        run.pacs.labels = {pre.study_uid: pre.label, post.study_uid: post.label}
    run.step(f"pre-op {pre.n_files} slices, follow-up {post.n_files} slices →", shown(run.out / "phantoms"))
    return pre, post


def _import_registry(run: _DemoRun) -> None:
    """The demo patient's clinical row, imported by the node's own ``patients import``."""
    registry = write_registry(run.out / "registry.csv")
    imported = subprocess.run(node_command(run.config, "patients", "import", str(registry)),
                              capture_output=True, text=True, timeout=120, env=own_config_env())
    if imported.returncode != 0:
        raise DemoError(f"registry import failed: {imported.stderr.strip() or imported.stdout.strip()}")
    run.step("imported fracture side, surgery date, height from", shown(registry))


def _start_node(run: _DemoRun) -> None:
    """``dicomnode serve`` as its own process (owned by ``run``), then wait until it answers C-ECHO."""
    run.step("starting the node as its own process:", f"{run.cli} serve --config {_runnable(run.config)}")
    with (run.out / "node.log").open("ab") as log:
        run.node = subprocess.Popen(node_command(run.config, "serve"), stdout=log, stderr=subprocess.STDOUT,
                                    env=own_config_env(TCP_NODELAY="1"), start_new_session=True)

    def node_up() -> bool:
        run.check_node()
        return echo("127.0.0.1", run.ports.node, NODE_AET)

    wait_for(node_up, 120, interval=0.5, what="the node to answer C-ECHO", error=DemoError)
    run.step(f"node {NODE_AET} is up on port {run.ports.node}, its log:", shown(run.out / "node.log"))


def _send_and_wait(run: _DemoRun, study: DemoStudy, followup: bool, timeout: float) -> None:
    """Send a study as the scanner would (to Orthanc, which routes it on, or straight to the node) and
    wait until its results are in the PACS; a job that ended without them stops the wait."""
    if isinstance(run.pacs, OrthancPacs):
        target_port, target_aet, route = run.pacs.dicom_port, run.pacs.aet, "Orthanc (routed on to the node)"
    else:
        target_port, target_aet, route = run.ports.node, NODE_AET, "the node"
    t0 = time.monotonic()
    try:
        n = send_series(study.folder, target_port, target_aet, calling_aet=SCANNER_AET)
    except ConnectionError as exc:
        raise DemoError(str(exc)) from exc
    run.step(f"{study.label}: {n} instances sent to {route}")
    last_jobs = 0.0

    def ready() -> bool:
        nonlocal last_jobs
        run.check_node()
        if time.monotonic() - last_jobs > 10:
            last_jobs = time.monotonic()
            problem = _job_problem(node_jobs(run.config), study.series_uid)
            if problem:
                raise DemoError(f"{study.label}: {problem}")
        return results_ready(run.pacs.objects(study.study_uid), followup)

    wait_for(ready, timeout, interval=1.0, what=f"the {study.label} results in the PACS", error=DemoError)
    run.step(f"{study.label}: SEG, SR{', summary and follow-up SR' if followup else ' and summary'} "
             f"are in the PACS ({time.monotonic() - t0:.0f} s)")


def _print_all(run: _DemoRun, pre: DemoStudy, post: DemoStudy, view: bool, options: tuple[str, ...]) -> None:
    """Results against the truth, where the outputs are, the job table command, (Orthanc) the viewer."""
    console = run.console
    console.rule("Results")
    print_results(console, pre, post, run.out / "node")
    console.rule("Where the outputs are")
    print_outputs(console, run.pacs, [pre, post], run.out, run.out / "node")
    console.print("the node's job table, any time later:")
    console.print(f"  {run.cli} jobs --config {_runnable(run.config)}", highlight=False, markup=False,
                  soft_wrap=True)
    if isinstance(run.pacs, OrthancPacs):
        console.rule("Open a study in a viewer")
        again = again_with_view(run.cli, list(options))
        show_in_viewer(console, run.pacs, [pre, post], keep_open=view, again=again, port=run.ports.viewer)


def run_demo(out: Path, pacs_kind: PacsKind, spacing: tuple[float, float, float], seed: int, timeout: float,
             console: Any, model: Path | None = None, view: bool = False,
             options: tuple[str, ...] = (), ports: DemoPorts | None = None) -> int:
    """The demo; ``options``: the command-line options it was run with (other than the view's);
    ``ports``: its listeners' (default: free ones)."""
    started = time.monotonic()
    ports = ports or claim_ports()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pacs = _make_pacs(pacs_kind, out, ports)
    config = write_node_config(out / "node.toml", port=ports.node, storage=out / "node",
                               pacs_port=pacs.dicom_port, model=model)
    run = _DemoRun(out=out, console=console, started=started, ports=ports, config=config, pacs=pacs,
                   cli=cli_command())
    try:
        pre, post = _make_studies(run, spacing, seed)
        _import_registry(run)
        run.step(f"starting the PACS: {pacs.name}")
        pacs.start()
        _start_node(run)
        for study, followup in ((pre, False), (post, True)):
            _send_and_wait(run, study, followup, timeout)
        _print_all(run, pre, post, view, options)
        run.step("demo finished")
        return 0
    finally:
        stop_process(run.node)
        pacs.stop()


def _chosen_ports(kind: PacsKind, node: int | None, pacs: int | None, orthanc_http: int | None,
                  viewer: int | None) -> DemoPorts:
    """The ports the options chose, checked before anything is replaced or started; a taken one (or an
    Orthanc port without Orthanc) ends the command with exit 2 and the option that moves it."""
    try:
        if not uses_orthanc(kind) and (orthanc_http or viewer):
            option = "--orthanc-http-port" if orthanc_http else "--viewer-port"
            raise PortError(f"{option}: the PACS is the local store SCP, which has no web port "
                            "(Orthanc is not installed, or --pacs local)")
        return claim_ports(node=node, pacs=pacs, orthanc_http=orthanc_http, viewer=viewer)
    except (PortError, DemoError) as exc:
        echo_problems(str(exc))
        raise typer.Exit(2) from exc


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the main app."""

    @app.command("demo")
    def demo(
        ctx: typer.Context,
        out: Annotated[Path, typer.Option(help="Work folder (replaced): phantoms, node storage, PACS copy.")]
        = Path("demo-output"),
        pacs: Annotated[PacsKind, typer.Option(help="auto: Orthanc when installed, else a local store SCP.")]
        = PacsKind.AUTO,
        spacing: Annotated[str, typer.Option(help="Phantom voxel size col,row,slice in mm (coarse = fast).")]
        = "3,3,5",
        seed: Annotated[int, typer.Option(help="Phantom patient seed.")] = 7,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for each study's results.")] = 900.0,
        model: Annotated[Path | None, typer.Option(help="Model package (default: the shipped demo).")]
        = None,
        view: Annotated[bool | None, typer.Option(
            "--view/--no-view", help="Keep Orthanc and the OHIF viewer open until Ctrl-C "
            "(default: when run in a terminal).")] = None,
        node_port: Annotated[int | None, typer.Option(
            min=1, max=65535, help="The node's DICOM port (default: a free one).")] = None,
        pacs_port: Annotated[int | None, typer.Option(
            min=1, max=65535, help="The PACS's DICOM port: Orthanc's or the local store SCP's "
            "(default: a free one).")] = None,
        orthanc_http_port: Annotated[int | None, typer.Option(
            min=1, max=65535, help="Orthanc's HTTP port, REST and Explorer (default: a free one).")] = None,
        viewer_port: Annotated[int | None, typer.Option(
            min=1, max=65535, help="The OHIF viewer's HTTP port with --view (default: a free one).")] = None,
    ) -> None:
        """Run the main job: node + PACS, a phantom patient pre-op and follow-up, volumes and change."""
        from rich.console import Console

        from seg.package import ModelPackageError, read_meta

        if model is not None:  # refused now, not by the node after the phantom patient is sent
            try:
                read_meta(model)
            except ModelPackageError as exc:
                raise typer.BadParameter(str(exc), param_hint="--model") from exc

        ports = _chosen_ports(pacs, node_port, pacs_port, orthanc_http_port, viewer_port)
        console = Console()
        console.rule(f"dicomnode demo — {dt.datetime.now():%Y-%m-%d %H:%M}")
        try:
            keep_open = view if view is not None else sys.stdin.isatty() and sys.stdout.isatty()
            # as typed (typer 0.29 has its own click, so the source is compared by name)
            options = tuple(x for name, value in ctx.params.items() if name != "view"
                            and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
                            for x in (_flag(name), _as_typed(getattr(value, "value", value))))
            code = run_demo(out.resolve(), pacs, spacing_option(spacing), seed, timeout, console, model,
                            view=keep_open, options=options, ports=ports)
        except DemoError as exc:
            console.print(f"[red]demo failed:[/] {exc}")
            raise typer.Exit(1) from exc
        raise typer.Exit(code)
