"""Our objects as a radiologist opens them: OHIF 3.13.2 over Orthanc's DICOMweb, in headless Chromium.

The node's own pipeline (shipped demo model, pairing on) processes a small phantom patient, pre-op and
follow-up, with the default configuration; CT, SEG, SRs and summary go into a real Orthanc; the harness
serves OHIF's built app with ``/dicom-web`` proxied to Orthanc on the same origin. The phantom's frames
are 121 × 154 pixels: 18,634 bits, not whole bytes, the size OHIF's BINARY reader garbles
(docs/upstream.md). Screenshots land in each test's ``tmp_path``; their paths are printed (``-s``).

Slow for a unit test (about 2 min on 2 busy cores: two pipeline runs, then a page per test);
select with ``-m viewer`` or leave out with ``-m "not viewer"``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from browser import launched

from dicomnode.clinical import registry
from dicomnode.config import Settings
from dicomnode.deploy.orthanc import dicomweb_plugin
from dicomnode.harness.orthanc import OrthancServer, have_orthanc
from dicomnode.harness.viewer import ViewerServer, chromium_path, ohif_dist
from dicomnode.processing.pipeline import JobInput, results_dir, run_pipeline
from reporting.sr import segments_of
from seg.io import load_dicom_series, load_nifti
from seg.labels import by_name
from seg.phantom import PhantomOptions, make_phantom, write_phantom

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # the test extra is not installed
    sync_playwright = None

MISSING = [name for name, found in (("Orthanc", have_orthanc()), ("orthanc-dicomweb", dicomweb_plugin()),
                                    ("OHIF in .viewer/", ohif_dist()), ("chromium", chromium_path()),
                                    ("playwright", sync_playwright)) if not found]
pytestmark = [pytest.mark.viewer, pytest.mark.timeout(900),
              pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} "
                                                       "(run bash scripts/setup.sh as root)")]

PATIENT = dict(seed=3, spacing_mm=(3.0, 3.0, 3.0), z_range_mm=(-60.0, 30.0), patient_id="VIEWER-0001",
               patient_name="Viewer^Phantom", sex="F", height_m=1.62)
ERROR_BOUNDARY = "Something went wrong"
# OHIF's segmentation state, read from the page: each labelmap slice as base64 bytes (values < 256)
LABELMAPS_JS = """() => {
  const tools = window.cornerstoneTools, cache = window.cornerstone && window.cornerstone.cache;
  if (!tools || !cache) return null;
  return tools.segmentation.state.getSegmentations().map(s => {
    const ids = (s.representationData.Labelmap || {}).imageIds || [];
    const images = ids.map(id => {
      const im = cache.getImage(id);
      if (!im) return null;
      const d = im.voxelManager ? im.voxelManager.getScalarData() : im.getPixelData();
      let max = 0, bin = '';
      for (let i = 0; i < d.length; i++) if (d[i] > max) max = d[i];
      const u = Uint8Array.from(d);
      for (let i = 0; i < u.length; i += 0x8000)
        bin += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
      return {ref: im.referencedImageId, rows: im.rows, columns: im.columns, max, data: btoa(bin)};
    });
    return {label: s.label, segments: Object.values(s.segments).map(x => x.label), images};
  });
}"""


@dataclass
class Study:
    """One processed study: its CT, the objects the node sends, and its results folder."""

    label: str
    study_uid: str
    ct_files: list[Path]
    outputs: list[Path]
    results: Path

    def output(self, description: str) -> Path:
        """The output whose SeriesDescription holds ``description`` (after "DEMO " for the demo model)."""
        found = [p for p in self.outputs if description in str(pydicom.dcmread(
            p, stop_before_pixels=True).SeriesDescription)]
        assert len(found) == 1, (description, self.outputs)
        return found[0]


@pytest.fixture(scope="module")
def patient(tmp_path_factory) -> dict[str, Study]:
    """Pre-op and follow-up of one phantom patient through the node's pipeline (default settings)."""
    root = tmp_path_factory.mktemp("viewer")
    settings = Settings(storage_dir=root / "node", pairing={"retrieve_priors": False},
                        worker={"device": "cpu"}, min_free_disk_mb=0, max_disk_used_pct=100)
    # the registry's facts, so both measurement SRs carry their TID 1502 time point and fracture facts
    registry_csv = root / "registry.csv"
    registry_csv.write_text("patient_id,height_m,sex,fracture_type,fractured_side,surgery_date\n"
                            f"{PATIENT['patient_id']},1.62,F,ITF,left,20240106\n")
    assert registry.import_csv(settings, registry_csv).imported == 1
    variants = {"pre-op": PhantomOptions(**PATIENT, study_date="20240105"),
                "follow-up": PhantomOptions(**PATIENT, study_date="20240504", postop=True,
                                            implant_side="left",
                                            atrophy={"gluteus_medius": 0.8, "vastus_lateralis": 0.85})}
    studies = {}
    for job_id, (label, opts) in enumerate(variants.items(), start=1):
        ph = make_phantom(opts)
        files = sorted((Path(write_phantom(ph, root / label)) / "dicom").glob("*"))
        series = str(ph.header.series_instance_uid)
        out = run_pipeline(JobInput(job_id=job_id, series_instance_uid=series, files=files,
                                    work_dir=root / f"work-{job_id}"), settings)
        studies[label] = Study(label, str(ph.header.study_instance_uid), files, out.outputs,
                               results_dir(settings, series))
    assert len(studies["follow-up"].outputs) == 4  # SEG, SR, summary, follow-up SR
    return studies


@dataclass
class Site:
    orthanc: OrthancServer
    viewer: ViewerServer


@pytest.fixture(scope="module")
def site(patient, tmp_path_factory) -> Iterator[Site]:
    """Orthanc (DICOMweb plugin) holding both studies, and OHIF in front of it."""
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc"), lua_scripts=[]).start()
    try:
        for study in patient.values():
            for f in [*study.ct_files, *study.outputs]:
                orthanc.upload_file(f)
        with ViewerServer(orthanc.url) as viewer:
            yield Site(orthanc, viewer)
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched() as chromium:
        yield chromium


class Viewer:
    """One OHIF page on a study, with the console's error-boundary lines and uncaught page errors."""

    def __init__(self, browser: Browser, site: Site, study: Study,
                 size: tuple[int, int] = (1400, 900)) -> None:
        self.page: Page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", lambda msg: self.errors.append(msg.text)
                     if "Error Boundary" in msg.text else None)
        # the first-visit tour would cover the viewport: mark it as seen
        self.page.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        self.opened = time.monotonic()
        self.page.goto(site.viewer.study_url(study.study_uid))

    def wait_for_ct(self, timeout_ms: float = 120_000) -> None:
        """The study's CT in the viewport, as a reader sees it before picking another series (OHIF
        3.13 can raise "stack viewport has been destroyed" when the viewport is swapped mid-load)."""
        self.page.locator('[data-cy="viewport-overlay-top-left"]').wait_for(timeout=timeout_ms)

    def open_series(self, modality: str, description: str) -> None:
        """Double-click the study browser's entry of a SEG/SR/OT series, as a user would."""
        entry = self.page.locator('[data-cy="study-browser-thumbnail-no-image"], '
                                  '[data-cy="study-browser-thumbnail"]',
                                  has_text=description).filter(has_text=modality)
        entry.first.dblclick(timeout=120_000)

    def confirm_load(self, timeout_ms: float = 60_000) -> None:
        """OHIF asks before it hydrates a SEG or SR into the viewport ("LOAD")."""
        self.page.get_by_text("LOAD", exact=True).click(timeout=timeout_ms)

    def shot(self, path: Path) -> Path:
        self.page.screenshot(path=path)
        print(f"screenshot: {path}")
        return path

    def has_error_boundary(self) -> bool:
        return self.page.get_by_text(ERROR_BOUNDARY).count() > 0 or any(
            "Error Boundary" in e for e in self.errors)

    def close(self) -> None:
        self.page.close()


# the image the first viewport shows, once it is the given SOP instance and decoded
SHOWN_IMAGE_JS = """uid => {
  const engine = window.cornerstone && window.cornerstone.getRenderingEngines()[0];
  const vp = engine && engine.getViewports()[0];
  const id = vp && vp.getCurrentImageId && vp.getCurrentImageId();
  const im = id && id.includes('/instances/' + uid + '/') && window.cornerstone.cache.getImage(id);
  return im ? {rows: im.rows, columns: im.columns} : null;
}"""


def _labelmaps(page: Page) -> Any:
    state = page.evaluate(LABELMAPS_JS)
    if not state or not state[0]["images"] or any(im is None for im in state[0]["images"]):
        return None
    return state


def _sop_uid(image_id: str) -> str:
    """The SOP Instance UID in a wadors image id (…/instances/<uid>/frames/1)."""
    return image_id.split("/instances/")[1].split("/")[0]


def test_seg_overlay_matches_label_map(browser, site, patient, tmp_path):
    """The SEG loads with our segment names, and every slice OHIF decodes equals what we wrote:
    pixel for pixel the SEG's segments as highdicom reads them, inside the label map's structures."""
    study = patient["follow-up"]
    seg_path = study.output("Thigh muscles SEG")
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == Settings().output.seg_type  # the node's default encoding
    viewer = Viewer(browser, site, study)
    try:
        viewer.wait_for_ct()  # the CT first, as in the SR and summary tests: no viewport swap mid-load
        viewer.open_series("SEG", "Thigh muscles SEG")
        viewer.confirm_load()
        deadline = time.monotonic() + 180
        state = None
        while state is None and time.monotonic() < deadline:
            state = _labelmaps(viewer.page)
            time.sleep(0.25)
        assert state is not None, "OHIF decoded no labelmap within 180 s"
        viewer.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        overlay_s = time.monotonic() - viewer.opened
        viewer.page.locator('[data-cy="panelSegmentation-btn"]').click()
        names = [str(item.SegmentLabel) for item in seg.SegmentSequence if int(item.SegmentNumber) > 0]
        viewer.page.get_by_text(names[0], exact=True).wait_for(timeout=30_000)
        shot = viewer.shot(tmp_path / "seg-overlay.png")
        panel = viewer.page.locator('[data-cy="data-row-title"]').all_inner_texts()
        assert not viewer.has_error_boundary(), viewer.errors
    finally:
        viewer.close()
    print(f"page open -> SEG overlay: {overlay_s:.1f} s ({shot})")

    assert set(names) <= set(panel), sorted(set(names) - set(panel))
    [seg_state] = state
    assert set(names) <= set(seg_state["segments"])
    ct = load_dicom_series(study.ct_files)
    labels = load_nifti(study.results / "labels.nii.gz").array
    k_of = {uid: k for k, uid in enumerate(ct.source_sop_uids)}
    numbers = [int(n) for n in seg.segment_numbers if int(n) > 0]
    written = np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ct.source_sop_uids, segment_numbers=numbers, combine_segments=True,
        relabel=False))  # (slices, rows, columns) of segment numbers
    label_of = np.zeros(max(numbers) + 1, dtype=np.int64)
    for number, name, _side in segments_of(pydicom.dcmread(seg_path, stop_before_pixels=True)):
        label_of[number] = by_name(name).label
    # one decoded labelmap slice per CT slice, each equal to what we wrote (a garbled BINARY read
    # yields several slices per image and staircase patterns)
    assert len(seg_state["images"]) == len(ct.source_sop_uids)
    for image in seg_state["images"]:
        k = k_of[_sop_uid(image["ref"])]
        assert image["max"] <= max(numbers)
        shown = np.frombuffer(base64.b64decode(image["data"]), dtype=np.uint8).reshape(
            image["rows"], image["columns"])
        differ = np.count_nonzero(shown != written[k])
        assert differ == 0, f"slice {k}: {differ} pixels differ from the SEG as written"
        truth = labels[:, :, k].T  # (i, j) -> (rows, columns)
        inside = shown > 0
        assert np.array_equal(label_of[shown[inside]], truth[inside]), f"slice {k}: overlay off its structure"


# the measurements OHIF parsed from an SR display set: tracking, placement, first graphic, labels
SR_STATE_JS = """uid => {
  const services = window.services;
  const ds = services && services.displaySetService.getActiveDisplaySets().find(
    d => d.SeriesInstanceUID === uid && d.isLoaded);
  if (!ds || !ds.measurements) return null;
  return ds.measurements.map(m => ({
    name: m.TrackingIdentifier, uid: m.TrackingUniqueIdentifier, loaded: m.loaded,
    sop: m.ReferencedSOPInstanceUID || null,
    type: m.coords && m.coords[0] ? m.coords[0].ValueType + ' ' + m.coords[0].GraphicType : null,
    labels: (m.labels || []).map(l => l.label + ': ' + l.value)}));
}"""


NEAR_METAL = ", next to metal implant"  # how a flagged side's first line ends (reporting.sr.viewer_name)
# the lines of text drawn over the first viewport (cornerstone's SVG layer: one tspan per line), and
# whether each lies wholly inside the viewport (OHIF puts a text box right of its outline, where the
# viewport's edge can cut it)
DRAWN_TEXT_JS = """() => {
  const pane = document.querySelector('[data-cy="viewport-pane"]');
  if (!pane) return [];
  const box = pane.getBoundingClientRect();
  return Array.from(pane.querySelectorAll('svg text tspan')).map(t => {
    const r = t.getBoundingClientRect();
    return {text: t.textContent, inside: r.width > 0 && r.left >= box.left && r.right <= box.right
            && r.top >= box.top && r.bottom <= box.bottom};
  });
}"""


def _near_metal_names(sr: pydicom.Dataset) -> set[str]:
    """Tracking identifiers of the groups flagged next to the implant (QANEARMTL = yes)."""
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return {str(next(i.TextValue for i in g.ContentSequence
                     if i.ConceptNameCodeSequence[0].CodeValue == "112039"))
            for g in container.ContentSequence
            if any(i.ConceptNameCodeSequence[0].CodeValue == "QANEARMTL" for i in g.ContentSequence)}


def _sr_measurements(sr: pydicom.Dataset) -> dict[str, dict[str, Any]]:
    """What OHIF should make of our SR: per tracking UID (OHIF merges the groups that share one), the
    group's NUMs as (meaning, value, unit), and the CT image its SCOORD is on, or None (SCOORD3D)."""
    out: dict[str, dict[str, Any]] = {}
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in container.ContentSequence:
        items = group.ContentSequence
        uid = next(i.UID for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112040")
        entry = out.setdefault(uid, {"nums": [], "image": None})
        for item in (i for i in items if i.ValueType == "NUM"):
            children = item.get("ContentSequence", [])
            if children and not any(c.ValueType in ("SCOORD", "SCOORD3D") for c in children):
                continue  # OHIF 3.13 labels a NUM with children only when one of them is coordinates
            value = item.MeasuredValueSequence[0]
            entry["nums"].append((item.ConceptNameCodeSequence[0].CodeMeaning, float(value.NumericValue),
                                  value.MeasurementUnitsCodeSequence[0].CodeValue))
            for c in children:
                if c.ValueType == "SCOORD":
                    entry["image"] = c.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return out


@pytest.mark.parametrize(("description", "name"), [("Thigh muscle volumes SR", "sr"),
                                                   ("Thigh muscle change since baseline", "change-sr")])
def test_sr_opens_without_error(browser, site, patient, tmp_path, description, name):
    """The measurement SR and the follow-up (change) SR open without OHIF's error boundary, OHIF
    places every measurement: a muscle's on the CT slice of its largest cross-section (its outline,
    labelled with our numbers), the scan-level ones on the CT's frame of reference (SCOORD3D), and
    stepping through all of them in the SR viewport stays free of errors."""
    sr = pydicom.dcmread(patient["follow-up"].output(description))
    if name == "sr":  # its TID 1502 time point (the registry's surgery date), opened with it
        texts: set[str] = set()
        sr.walk(lambda _, elem: texts.add(str(elem.value)) if elem.keyword == "TextValue" else None)
        assert "Post-operative day 119 (surgery 2024-01-06)" in texts
    expected = _sr_measurements(sr)
    flagged = _near_metal_names(sr)
    assert flagged  # the follow-up has its implant on the left
    drawn: set[str] = set()  # every line of text the viewport drew while stepping
    seen: set[str] = set()  # ... and those of them wholly inside the viewport
    # a reading workstation's screen: OHIF's text boxes right of the left thigh's outlines fit
    viewer = Viewer(browser, site, patient["follow-up"], size=(1920, 1080))
    state = None
    try:
        viewer.wait_for_ct()
        viewer.open_series("SR", description)
        load = viewer.page.get_by_text("LOAD", exact=True)
        deadline = time.monotonic() + 60  # OHIF prompts ("LOAD"), or loads (or fails) within seconds
        while not viewer.has_error_boundary() and time.monotonic() < deadline:
            if load.count():
                load.first.click()
            state = viewer.page.evaluate(SR_STATE_JS, str(sr.SeriesInstanceUID))
            if state and all(m["loaded"] for m in state):
                break
            viewer.page.wait_for_timeout(250)
        viewer.page.wait_for_timeout(1500)  # let the viewport draw the first measurement
        viewer.shot(tmp_path / f"{name}.png")
        assert not viewer.has_error_boundary(), viewer.errors
        # a reader steps through the measurements with the viewport's arrows, every one and back to the first
        for _ in range(len(state or [])):
            viewer.page.locator('[data-cy="viewport-action-arrows-right"]').click()
            viewer.page.wait_for_timeout(100)
            lines = viewer.page.evaluate(DRAWN_TEXT_JS)
            if (any(NEAR_METAL in x["text"] and x["inside"] for x in lines)
                    and not any(NEAR_METAL in t for t in seen)):
                viewer.shot(tmp_path / f"{name}-near-metal.png")  # the first flag in full view
            drawn.update(x["text"] for x in lines)
            seen.update(x["text"] for x in lines if x["inside"])
        viewer.page.wait_for_timeout(1000)
        assert not viewer.has_error_boundary(), viewer.errors
    finally:
        viewer.close()
    assert state is not None, "OHIF did not load the SR within 60 s"
    shown = {m["uid"]: m for m in state}
    assert set(shown) == set(expected)
    assert [m["name"] for m in state if not m["loaded"]] == []
    on_images = 0
    for uid, want in expected.items():
        got = shown[uid]
        assert {label.split(": ")[0] for label in got["labels"]} >= {n for n, _, _ in want["nums"]}
        # the first line beside the outline names the muscle and side (our Comment row), or says why
        # not; a side next to the implant says so there (OHIF shows no qualitative evaluation)
        named = f"{got['name']}{NEAR_METAL if got['name'] in flagged else ''}: "
        assert got["labels"][0] in (named, f"{got['name']} not found: "), got["labels"]
        assert not any(label.startswith("Time Point Order") for label in got["labels"]), got["labels"]
        if want["image"] is None:
            assert got["type"] == "SCOORD3D POLYLINE", got
            continue
        on_images += 1
        assert (got["type"], got["sop"]) == ("SCOORD POLYLINE", want["image"]), got
        for meaning, value, unit in want["nums"]:
            text = f"{value:.2f}" if value else ""  # OHIF 3.13 writes no number for a zero
            assert f"{meaning}: {text} {unit}" in got["labels"], (got["labels"], meaning, value)
    # and the viewport drew it: the flagged sides' first lines, none of the others'
    shown_flags = {line.removesuffix(f"{NEAR_METAL}: ") for line in drawn if line.endswith(f"{NEAR_METAL}: ")}
    assert shown_flags and shown_flags <= flagged, (shown_flags, flagged)
    assert not {f"{n}: " for n in flagged} & drawn
    assert any(line.endswith(f"{NEAR_METAL}: ") for line in seen), "no flag drawn in full view"
    print(f"{name}: {len(state)} measurements, {on_images} outlined on their CT slice, "
          f"{len(shown_flags)} of {len(flagged)} flagged drawn next to metal")


def test_summary_page_displays(browser, site, patient, tmp_path):
    """The summary Secondary Capture is the viewport's image, decoded at full size, and drawn."""
    study = patient["follow-up"]
    summary = pydicom.dcmread(study.output("Thigh muscle summary"), stop_before_pixels=True)
    viewer = Viewer(browser, site, study)
    try:
        viewer.wait_for_ct()
        viewer.open_series("OT", "Thigh muscle summary")
        overlay = viewer.page.locator('[data-cy="viewport-overlay-top-left"]')
        overlay.filter(has_text="Thigh muscle summary").wait_for(timeout=60_000)
        shown = viewer.page.wait_for_function(SHOWN_IMAGE_JS, arg=str(summary.SOPInstanceUID),
                                              timeout=60_000).json_value()
        viewer.page.wait_for_timeout(1000)  # one more frame drawn
        shot = viewer.shot(tmp_path / "summary.png")
        png = viewer.page.locator('[data-cy="viewport-pane"] canvas').first.screenshot()
        assert not viewer.has_error_boundary(), viewer.errors
    finally:
        viewer.close()
    from io import BytesIO

    from PIL import Image

    assert (shown["rows"], shown["columns"]) == (summary.Rows, summary.Columns)
    image = np.asarray(Image.open(BytesIO(png)).convert("L"))
    assert (image > 128).mean() > 0.01, f"summary viewport black ({shot})"  # text, table, key images


def test_viewer_server_proxies_orthanc_dicomweb(tmp_path):
    """Orthanc loads its DICOMweb plugin; the viewer's origin serves OHIF, its generated configuration,
    and read-only DICOMweb (with bulk data URIs pointing back at itself); nothing outside dist/."""
    import json
    import urllib.error
    import urllib.request

    from dicomnode.harness.series import write_ct_series

    series = write_ct_series(tmp_path / "ct", n=2)
    with OrthancServer(tmp_path / "orthanc", lua_scripts=[]) as orthanc, ViewerServer(orthanc.url) as viewer:
        assert orthanc.has_dicomweb
        for f in series.files:
            orthanc.upload_file(f)

        def get(path: str, accept: str = "application/dicom+json") -> tuple[int, str, bytes]:
            req = urllib.request.Request(viewer.url + path, headers={"Accept": accept})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status, resp.headers["Content-Type"], resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers["Content-Type"], exc.read()

        status, _, body = get("/dicom-web/studies")
        studies = json.loads(body)
        assert status == 200 and len(studies) == 1
        study_uid = studies[0]["0020000D"]["Value"][0]
        status, _, body = get(f"/dicom-web/studies/{study_uid}/metadata")
        assert status == 200 and viewer.url + "/dicom-web/" in body.decode()  # bulk data comes back here
        status, kind, body = get("/app-config.js")
        assert status == 200 and "javascript" in kind and b"window.location.origin + '/dicom-web'" in body
        index = (ohif_dist() / "index.html").read_bytes()
        assert get(f"/viewer?StudyInstanceUIDs={study_uid}")[2] == index  # the app's own routes
        assert get("/../../etc/passwd")[2] == index and get("/%2e%2e/%2e%2e/etc/passwd")[2] == index
        stow = urllib.request.Request(viewer.url + "/dicom-web/studies", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(stow, timeout=30)
        assert refused.value.code == 501  # read-only: no STOW through the viewer
