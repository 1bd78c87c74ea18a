"""The test-and-demo harness (``dicomnode.harness``): one copy of each helper, no ``sys.path`` tricks,
the Orthanc configuration importable from an installed package, node configurations written as TOML."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from dicomnode.commands.common import parse_spacing
from dicomnode.harness import toml_text, write_toml

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("dicomnode", "tests", "benchmarks") for p in (REPO / folder).rglob("*.py"))


def _hits(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.MULTILINE)
    return [f"{p.relative_to(REPO)}:{text[: m.start()].count(chr(10)) + 1}"
            for p in SOURCES for text in [p.read_text()] for m in rx.finditer(text)]


@pytest.mark.parametrize("name", ["free_port", "port_open", "wait_for", "write_toml",
                                  "send_series", "nodelay", "pynetdicom_send", "send_verbatim", "storescu",
                                  "echoscu", "rewrite", "dataset_bytes", "store_files"])
def test_each_helper_is_defined_once(name: str) -> None:
    """free_port, the waits, the TOML writer, the senders... live in the harness only."""
    hits = _hits(rf"^\s*def _?{name}\(")
    assert len(hits) == 1 and hits[0].startswith("dicomnode/harness/"), hits


@pytest.mark.parametrize("name", ["OrthancServer", "StoreSCP", "CapturingSCP"])
def test_each_stand_in_peer_is_defined_once(name: str) -> None:
    """The PACS and node stand-ins (Orthanc, dcmtk storescp, a capturing pynetdicom SCP): one class each."""
    hits = _hits(rf"^class {name}\b")
    assert len(hits) == 1 and hits[0].startswith("dicomnode/harness/"), hits


def test_one_pynetdicom_stand_in_server() -> None:
    """Outside the node itself, only the harness's capturing SCP starts a pynetdicom server."""
    servers = [h for h in _hits(r"\.start_server\(") if not h.startswith("dicomnode/network/")]
    assert [h.split(":")[0] for h in servers] == ["dicomnode/harness/capture.py"], servers


def test_no_second_spacing_parser() -> None:
    """No other ``"3,3,5"`` parser: its mark is widening one number to three (``parts = parts * 3``)."""
    hits = _hits(r"^\s*(\w+) = \1 \* 3\s*$")
    assert len(hits) == 1 and hits[0].startswith("dicomnode/commands/common.py"), hits


def test_benchmarks_import_the_harness_without_sys_path() -> None:
    bench = sorted((REPO / "benchmarks").glob("*.py"))
    assert bench
    code = bench + sorted((REPO / "tests").glob("*.py"))
    assert [p.name for p in code if re.search(r"sys\.path\.(insert|append)", p.read_text())] == []
    assert [p.name for p in bench if re.search(r"^\s*from (peers|orthanc|series_factory|test_\w+) import",
                                                 p.read_text(), re.MULTILINE)] == []


def test_orthanc_config_ships_in_the_package() -> None:
    """The demo renders Orthanc's configuration from the package, not from a checkout's deploy/ folder."""
    from dicomnode.deploy import orthanc as render

    assert render.BASE_CONFIG.is_file() and render.ROUTE_LUA.is_file()
    assert render.BASE_CONFIG.parent == Path(render.__file__).resolve().parent
    for name in ("orthanc.json", "route.lua"):  # the administrator's copy is the same file
        assert (REPO / "deploy" / "orthanc" / name).resolve() == (render.HERE / name).resolve()
    cfg = render.render(dicom_port=1234, node_port=5678, stable_age=1)
    assert cfg["DicomPort"] == 1234 and cfg["StableAge"] == 1
    assert cfg["DicomModalities"][cfg["ThighRouting"]["NodeModality"]]["Port"] == 5678
    demo = (REPO / "dicomnode" / "commands" / "demo.py").read_text()
    assert "parents[2]" not in demo and '"deploy" / "orthanc"' not in demo and "render.py" not in demo
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = set(pyproject["tool"]["setuptools"]["package-data"]["dicomnode"])
    assert shipped >= {"deploy/*.json", "deploy/*.lua"}


def test_demo_node_config_is_toml_that_round_trips(tmp_path: Path) -> None:
    from dicomnode.commands.demo import write_node_config
    from dicomnode.config import load_settings

    storage = tmp_path / 'odd "name" \\ here'
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")  # config asks only that a package is there
    path = write_node_config(tmp_path / "node.toml", port=4100, storage=storage, pacs_port=4200,
                             model=tmp_path / "model")
    data = tomllib.loads(path.read_text())
    assert data["storage_dir"] == storage.as_posix() and data["pacs"]["port"] == 4200
    settings = load_settings(path)
    assert settings.port == 4100 and settings.pacs.port == 4200 and settings.pairing.retrieve_priors is False
    assert "model_path" not in tomllib.loads(toml_text({"model_path": None, "port": 1}))


def test_write_toml_values(tmp_path: Path) -> None:
    data = {"a": True, "b": 1.5, "c": [1, "x"], "d": "é\n\"q\"", "t": {"k": 2, "p": tmp_path}}
    back = tomllib.loads(write_toml(tmp_path / "x.toml", data).read_text())
    assert back == {**data, "t": {"k": 2, "p": tmp_path.as_posix()}}
    with pytest.raises(TypeError):
        toml_text({"x": object()})


@pytest.mark.parametrize("text,expected", [("3", (3.0, 3.0, 3.0)), ("3,3,5", (3.0, 3.0, 5.0)),
                                            ("1.5x1.5x3", (1.5, 1.5, 3.0)), ("2×2×4", (2.0, 2.0, 4.0))])
def test_parse_spacing(text: str, expected: tuple[float, float, float]) -> None:
    assert parse_spacing(text) == expected


@pytest.mark.parametrize("text", ["", "1,2", "0", "-1,1,1", "a,b,c"])
def test_parse_spacing_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_spacing(text)


def test_render_set_refuses_what_is_not_json_and_warns_of_an_unknown_key(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`render.py --set StableAge=abc` ended in a JSONDecodeError traceback; a misspelt key was written
    for Orthanc to ignore without a word."""
    from dicomnode.deploy import orthanc as render

    with pytest.raises(SystemExit) as stop:
        render.main(["--set", "StableAge=abc"])
    assert stop.value.code == 2 and "--set StableAge: 'abc' is not JSON" in capsys.readouterr().err
    assert render.main(["--set", "StabelAge=10", "--set", "StableAge=10"]) == 0
    printed = capsys.readouterr()
    assert "warning: --set StabelAge: not a key of" in printed.err and "StableAge: not" not in printed.err
    assert '"StableAge": 10' in printed.out


def test_free_port_hands_out_no_port_twice_before_it_is_bound():
    """Servers of one test take their ports before any binds: the OS's random pick repeats a port
    among a few hundred (about two in 256 calls here), and the node then failed "Address already in
    use" beside its Orthanc. 256 ports in a row, unbound, are all distinct."""
    from dicomnode.harness.net import free_port

    ports = [free_port() for _ in range(256)]
    assert len(set(ports)) == len(ports)


def test_parallel_test_workers_hand_out_disjoint_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under pytest-xdist each worker (and what it starts) takes its own share of the ports, so two
    workers never hand one port to two servers (split by pairs: bind(0) hands out odd ports)."""
    from dicomnode.harness import net

    shares = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        monkeypatch.setattr(net, "_HANDED_OUT", net.deque(maxlen=256))
        shares.append({net.free_port() for _ in range(64)})
    assert not shares[0] & shares[1]
    assert {p // 2 % 2 for p in shares[0]} == {0} and {p // 2 % 2 for p in shares[1]} == {1}
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert net._port_share() == (0, 1)
