"""Synthetic cohort mirroring Kim et al. (PeerJ 2024) through measure → pairing → cohort report.

18 patients as in the paper (FNF: 2 female, 4 male; ITF: 10 female, 2 male), a pre-operative and a
post-operative phantom each. The post-operative phantom loses volume on the operated side only, per
muscle, by the paper's Table 3 loss ratio for the patient's group × a per-patient jitter, so every
change is known. Labels are the phantom's ground truth (no model), so the measured change must equal
the truth exactly. Heights come from a registry CSV, as in the node.

    .venv/bin/python benchmarks/cohort.py [--out DIR] [--spacing 5]

Prints Table 2 (total loss by sex × fracture type) and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from seg.labels import ANALYSED_MUSCLES

# The paper's Table 3 loss ratios (%), per group, in ANALYSED_MUSCLES order.
PAPER_LOSS_RATIO = {
    "Female FNF": [
        16.8,
        3.3,
        23,
        21.4,
        19.3,
        12.4,
        13.4,
        14.4,
        9.4,
        18,
        15.4,
        11.8,
        13.4,
        14.4,
        26.2,
        28.9,
        34.6,
        25.4,
        7.8,
        25.4,
        19,
    ],
    "Female ITF": [
        44.8,
        37.8,
        43.4,
        45.4,
        35.6,
        43.7,
        48.9,
        41.9,
        40.1,
        34.8,
        37.7,
        39,
        34.9,
        38.2,
        49.1,
        47.5,
        44.2,
        43.1,
        43.6,
        47.9,
        41,
    ],
    "Male FNF": [
        42.8,
        27.9,
        41.2,
        37,
        29.6,
        28.3,
        52.5,
        31.2,
        45.9,
        48.4,
        34.4,
        29.4,
        38.1,
        53.2,
        32.2,
        52.3,
        60.4,
        48.5,
        34.3,
        40.2,
        27.9,
    ],
    "Male ITF": [
        45.2,
        17.6,
        33.8,
        39.8,
        30.4,
        44.3,
        43.8,
        26.9,
        51.8,
        46.4,
        38,
        26.2,
        22.7,
        19,
        36.4,
        33.8,
        54.2,
        22.2,
        18.3,
        46.3,
        23.8,
    ],
}
# The paper's Table 3 columns are in its own muscle order; map them onto ours by name.
PAPER_ORDER = [
    "sartorius",
    "rectus_femoris",
    "vastus_lateralis",
    "vastus_intermedius",
    "vastus_medialis",
    "adductor_longus",
    "adductor_brevis",
    "adductor_magnus",
    "gracilis",
    "pectineus",
    "gluteus_maximus",
    "gluteus_medius",
    "gluteus_minimus",
    "tensor_fasciae_latae",
    "piriformis",
    "obturator_internus",
    "obturator_externus",
    "quadratus_femoris",
    "semitendinosus",
    "semimembranosus",
    "biceps_femoris",
]
COMPOSITION = [("FNF", "F", 2), ("FNF", "M", 4), ("ITF", "F", 10), ("ITF", "M", 2)]


@dataclass
class PatientSpec:
    patient_id: str
    seed: int
    sex: str
    fracture_type: str
    height_m: float
    fractured_side: str
    pre_date: str
    surgery_date: str
    post_date: str
    koval_grade: int
    atrophy: dict[str, float] = field(default_factory=dict)  # operated side: volume factor kept

    @property
    def group(self) -> str:
        return f"{'Female' if self.sex == 'F' else 'Male'} {self.fracture_type}"


def cohort_spec(seed: int = 2024) -> list[PatientSpec]:
    """The 18 synthetic patients (deterministic)."""
    rng = np.random.default_rng(seed)
    out: list[PatientSpec] = []
    n = 0
    for fracture, sex, count in COMPOSITION:
        group = f"{'Female' if sex == 'F' else 'Male'} {fracture}"
        ratio = dict(zip(PAPER_ORDER, PAPER_LOSS_RATIO[group], strict=True))
        for _ in range(count):
            n += 1
            pre = date(2023, 1, 1) + timedelta(days=int(rng.integers(0, 300)))
            surgery = pre + timedelta(days=int(rng.integers(0, 3)))
            post = surgery + timedelta(days=int(rng.integers(60, 400)))
            height = float(np.round(rng.normal(1.56 if sex == "F" else 1.69, 0.05), 2))
            atrophy = {
                m: float(np.round(1.0 - np.clip(ratio[m] / 100.0 * rng.uniform(0.6, 1.4), 0.02, 0.9), 3))
                for m in ANALYSED_MUSCLES
            }
            out.append(
                PatientSpec(
                    patient_id=f"SYN{n:03d}",
                    seed=1000 + n,
                    sex=sex,
                    fracture_type=fracture,
                    height_m=height,
                    fractured_side=str(rng.choice(["left", "right"])),
                    pre_date=pre.strftime("%Y%m%d"),
                    surgery_date=surgery.strftime("%Y%m%d"),
                    post_date=post.strftime("%Y%m%d"),
                    koval_grade=int(rng.integers(1, 5)),
                    atrophy=atrophy,
                )
            )
    return out


def write_registry_csv(spec: list[PatientSpec], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "patient_id",
                "height_m",
                "sex",
                "fracture_type",
                "fractured_side",
                "surgery_date",
                "koval_grade",
            ]
        )
        for p in spec:
            w.writerow(
                [
                    p.patient_id,
                    f"{p.height_m:.2f}",
                    p.sex,
                    p.fracture_type,
                    p.fractured_side,
                    p.surgery_date,
                    p.koval_grade,
                ]
            )
    return path


def phantom_options(p: PatientSpec, post: bool, spacing_mm: float):
    from seg.phantom import PhantomOptions

    return PhantomOptions(
        seed=p.seed,
        spacing_mm=(spacing_mm, spacing_mm, spacing_mm),
        patient_id=p.patient_id,
        patient_name=f"Synthetic^{p.patient_id}",
        sex=p.sex,
        height_m=p.height_m,
        study_date=p.post_date if post else p.pre_date,
        study_time="101500" if post else "083000",
        postop=post,
        atrophy=p.atrophy if post else {},
        implant_side=p.fractured_side if post else None,
        noise=False,
        write_height=True,
    )


def measure_and_record(settings, p: PatientSpec, post: bool, spacing_mm: float, keep_labels: bool = False):
    """Phantom → truth labels → measure → record_result; returns (changes, labels or None, timings)."""
    from pydicom.uid import generate_uid

    from dicomnode.clinical import registry
    from dicomnode.clinical.pairing import ResultRecord, record_result
    from seg.measure import measure_volumes, write_volumes
    from seg.phantom import make_phantom
    from seg.records import ModelInfo

    t0 = time.perf_counter()
    ph = make_phantom(phantom_options(p, post, spacing_mm))
    t1 = time.perf_counter()
    header = ph.header
    facts = registry.facts_for(settings, header)
    height, source = facts.height_m, facts.height_source
    record = measure_volumes(
        ph.labels,
        ph.ct,  # its QA's metal places a CT dated on the surgery day (9 of the 18 pre-operative)
        height_m=height,
        height_source=source,
        model=ModelInfo(name="ground-truth labels", version="phantom", demo=True),
    )
    series = str(header.series_instance_uid)
    out_dir = Path(settings.storage_dir) / "results" / series
    write_volumes(record, out_dir)
    t2 = time.perf_counter()
    changes = record_result(
        settings,
        ResultRecord(
            patient_id=str(header.patient_id),
            issuer_of_patient_id=header.issuer_of_patient_id or "",
            patient_sex=header.sex or "",
            patient_size_m=header.size_m,
            study_instance_uid=str(header.study_instance_uid),
            study_date=str(header.study_date),
            study_time=header.study_time or "",
            series_instance_uid=series,
            volumes_json=out_dir / "volumes.json",
            seg_sop_instance_uid=generate_uid(entropy_srcs=[series, "seg"]),
            sr_sop_instance_uid=generate_uid(entropy_srcs=[series, "sr"]),
            result_dir=out_dir,
        ),
    )
    t3 = time.perf_counter()
    return (
        changes,
        (ph.labels if keep_labels else None),
        {"phantom": t1 - t0, "measure": t2 - t1, "pairing": t3 - t2},
    )


def run_cohort(
    settings,
    work_dir: Path,
    spacing_mm: float = 5.0,
    spec: list[PatientSpec] | None = None,
    keep_labels: bool = False,
) -> dict:
    """Import the registry, then measure and record every patient's pre and post phantom."""
    from dicomnode.clinical import registry

    spec = spec if spec is not None else cohort_spec()
    work_dir.mkdir(parents=True, exist_ok=True)
    registry.import_csv(settings, write_registry_csv(spec, work_dir / "registry.csv"))
    timings = {"phantom": 0.0, "measure": 0.0, "pairing": 0.0}
    results: dict[str, dict] = {}
    for p in spec:
        results[p.patient_id] = {"spec": p}
        for post in (False, True):
            changes, labels, t = measure_and_record(settings, p, post, spacing_mm, keep_labels)
            for k, v in t.items():
                timings[k] += v
            key = "post" if post else "pre"
            results[p.patient_id][f"{key}_changes"] = changes
            results[p.patient_id][f"{key}_labels"] = labels
    return {"results": results, "timings": timings, "spec": spec}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: a temporary one)")
    parser.add_argument("--spacing", type=float, default=5.0, help="phantom voxel size in mm (isotropic)")
    parser.add_argument("--storage", type=Path, default=None,
                        help="keep the node's storage (index, registry, results) in this new or empty "
                             "folder, for `DICOMNODE_STORAGE_DIR=FOLDER dicomnode report cohort ...` "
                             "(default: a temporary one, deleted)")
    args = parser.parse_args(argv)
    if args.storage is not None and args.storage.exists() and any(args.storage.iterdir()):
        parser.error(f"--storage {args.storage}: not empty (a second cohort would mix with the first)")

    from dicomnode.clinical import pairing
    from dicomnode.config import Settings
    from reporting.cohort.report import build_cohort, table2_numbers, write_report

    t_start = time.perf_counter()
    keep = contextlib.nullcontext(str(args.storage)) if args.storage is not None else None
    with keep or tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        work = Path(tmp)
        settings = Settings(storage_dir=work if args.storage is not None else work / "var")
        settings.pairing.retrieve_priors = False
        run = run_cohort(settings, work, spacing_mm=args.spacing)
        t_measured = time.perf_counter()
        entries = pairing.cohort_entries(settings)
        report = build_cohort(entries)
        out = args.out or (work / "report")
        written = write_report(report, out)
        t_end = time.perf_counter()
        pairs = sum(1 for e in entries if e.change is not None and not e.reasons)
        print(
            f"synthetic cohort: {len(run['spec'])} patients, {2 * len(run['spec'])} phantoms at "
            f"{args.spacing:g} mm; pairs found: {pairs}"
        )
        print("group sizes: " + ", ".join(f"{g} {n}" for g, n in report.group_sizes.items()))
        for note in report.notes:
            print(f"note: {note}")
        print()
        print(table2_numbers(report))
        t = run["timings"]
        print(
            f"\nwall time: total {t_end - t_start:.1f} s = phantoms {t['phantom']:.1f} s + measure "
            f"{t['measure']:.1f} s + pairing {t['pairing']:.1f} s\n  (+ overhead "
            f"{t_measured - t_start - sum(t.values()):.1f} s) + cohort report {t_end - t_measured:.1f} s"
        )
        if args.out:
            print(f"report: {written['html']}")
        if args.storage is not None:
            print(f"storage: {args.storage}\n  DICOMNODE_STORAGE_DIR={args.storage} dicomnode report cohort "
                  "--out DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
