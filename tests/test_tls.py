"""DICOM TLS (issue 15): the listener and the node's associations to the PACS over TLS, against real peers.

Certificates are made here with the ``openssl`` command line: one test CA signs the node's, dcmtk's and
Orthanc's certificates (each names 127.0.0.1), and a second, untrusted CA signs a rogue client's. Peers:
``dicomnode serve`` subprocesses (client certificates optional, and required), dcmtk ``storescu`` /
``echoscu`` with ``+tls`` / ``+tla`` and plain, and Orthanc with its own DICOM TLS as the PACS the node
echoes, sends, queries and retrieves from (Orthanc's C-MOVE comes back to the node over TLS too).
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc import OrthancServer, requires_orthanc
from peers import NodeProcess, echoscu, free_port, requires_dcmtk, storescu, wait_for, write_toml
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from series_factory import SeriesFiles, write_ct_series

from dicomnode.config import ConfigError, PacsSettings, Settings, TlsSettings, check_file
from dicomnode.network.retrieve import find_studies, move_series
from dicomnode.network.sender import echo, send_files
from dicomnode.network.tls import TlsError, client_tls_args, server_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")

ACSE_TIMEOUT = 3.0  # the echo that must not wait behind a silent caller gets all of it
LEAF_EXTENSIONS = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")


# -- certificates --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The test CA's bundle and the certificates it signed; ``rogue`` is signed by another CA."""

    ca: Path
    node: KeyPair
    client: KeyPair
    orthanc: KeyPair
    rogue: KeyPair
    rogue_ca: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> KeyPair:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return KeyPair(folder / f"{name}.pem", folder / f"{name}.key")


def make_leaf(folder: Path, name: str, ca: KeyPair, serial: int) -> KeyPair:
    (folder / "leaf.ext").write_text(LEAF_EXTENSIONS)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key),
            "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem", "-extfile", "leaf.ext",
            cwd=folder)
    return KeyPair(folder / f"{name}.pem", folder / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = make_ca(folder, "test-ca"), make_ca(folder, "rogue-ca")
    return Pki(ca.cert, make_leaf(folder, "node", ca, 2), make_leaf(folder, "storescu", ca, 3),
               make_leaf(folder, "orthanc", ca, 4), make_leaf(folder, "rogue", rogue_ca, 5), rogue_ca.cert)


def tls_section(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "certificate": str(pki.node.cert), "private_key": str(pki.node.key),
            "ca_certificates": str(pki.ca), **extra}


# -- nodes ---------------------------------------------------------------------------------------------
def tls_node(root: Path, pki: Pki, *, required: bool) -> Iterator[NodeProcess]:
    with NodeProcess(root / "node", acse_timeout_seconds=ACSE_TIMEOUT, worker={"enabled": False},
                     tls=tls_section(pki, require_client_certificate=required)) as node:
        yield node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NodeProcess]:
    """Client certificates optional (verified when sent)."""
    yield from tls_node(tmp_path_factory.mktemp("tls-optional"), pki, required=False)


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NodeProcess]:
    """Client certificates required."""
    yield from tls_node(tmp_path_factory.mktemp("tls-required"), pki, required=True)


# -- dcmtk as the caller -------------------------------------------------------------------------------
def with_cert(pki: Pki, pair: KeyPair | None = None) -> list[str]:
    """dcmtk options: TLS with this key pair (default: the trusted client's), always trusting the test CA."""
    pair = pair or pki.client
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca)]


def anonymous(pki: Pki) -> list[str]:
    """dcmtk options: TLS without a client certificate."""
    return ["+tla", "+cf", str(pki.ca)]


def stored(node: NodeProcess, series: SeriesFiles) -> int:
    return int(node.sql("SELECT COUNT(*) FROM instances WHERE series_uid=?", (series.series_uid,))[0][0])


def refusals(node: NodeProcess) -> list[str]:
    return [line for line in node.log().splitlines() if "tls-handshake-failed" in line]


@requires_dcmtk
def test_storescu_over_tls_is_stored(node: NodeProcess, pki: Pki, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "a", name="tls-a", n=5, size=8, random_pixels=True)
    result = storescu(node.port, series.files, extra=with_cert(pki))
    assert result.returncode == 0, result.stdout + result.stderr
    assert stored(node, series) == 5
    on_disk = node.storage_dir / "incoming" / series.study_uid / series.series_uid
    assert sorted(p.name for p in on_disk.iterdir()) == sorted(f"{uid}.dcm" for uid in series.sop_uids)
    first = on_disk / f"{series.sop_uids[0]}.dcm"  # TLS changes the transport only
    assert pydicom.dcmread(first).PixelData == pydicom.dcmread(series.files[0]).PixelData
    assert "client-certificate=optional" in node.log()


@requires_dcmtk
def test_plain_association_to_the_tls_port_fails_cleanly(node: NodeProcess, pki: Pki) -> None:
    before = len(refusals(node))
    started = time.monotonic()
    plain = echoscu(node.port, [])
    assert plain.returncode != 0 and time.monotonic() - started < 10
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assert not ae.associate("127.0.0.1", node.port, ae_title="THIGHNODE").is_established
    wait_for(lambda: len(refusals(node)) >= before + 2, 10, what="two tls-handshake-failed log lines")
    assert node.proc is not None and node.proc.poll() is None
    assert echoscu(node.port, with_cert(pki)).returncode == 0  # and it keeps serving TLS callers


@requires_dcmtk
def test_a_silent_connection_does_not_stall_the_listener(node: NodeProcess, pki: Pki) -> None:
    """pynetdicom would do the handshake in its single accept thread, without a time-out."""
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        started = time.monotonic()
        assert echoscu(node.port, with_cert(pki)).returncode == 0
        assert time.monotonic() - started < ACSE_TIMEOUT
        silent.settimeout(ACSE_TIMEOUT + 5)
        assert silent.recv(1024) == b""  # closed by the node once ARTIM ran out


def closed_by_node(sock: socket.socket, within: float) -> float | None:
    """Trickle one byte every 0.3 s; seconds until the node closed the connection, or None."""
    started = time.monotonic()
    sock.settimeout(0.3)
    while (elapsed := time.monotonic() - started) < within:
        try:
            sock.sendall(b"\x00")
            if sock.recv(1024) == b"":
                return elapsed
        except TimeoutError:
            continue
        except OSError:
            return elapsed
    return None


def test_a_hello_trickled_byte_by_byte_is_cut_off_at_the_acse_timeout(node: NodeProcess) -> None:
    """The handshake has ACSE time in all; a per-read time-out would restart with every byte."""
    with socket.create_connection(("127.0.0.1", node.port)) as slow:
        slow.sendall(b"\x16\x03\x01\x02\x00")  # a TLS handshake record header announcing 512 bytes
        elapsed = closed_by_node(slow, within=ACSE_TIMEOUT + 4)
    assert elapsed is not None and elapsed < ACSE_TIMEOUT + 1.5


@requires_dcmtk
def test_client_certificate_optional_but_verified_when_sent(node: NodeProcess, pki: Pki) -> None:
    assert echoscu(node.port, anonymous(pki)).returncode == 0
    before = len(refusals(node))
    rogue = echoscu(node.port, with_cert(pki, pki.rogue))
    assert rogue.returncode != 0
    wait_for(lambda: len(refusals(node)) > before, 10, what="the rogue certificate's refusal")
    assert "client certificate refused" in refusals(node)[-1]


@requires_dcmtk
def test_required_client_certificate_refuses_a_caller_without_one(strict_node: NodeProcess, pki: Pki,
                                                                   tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "c", name="tls-c", n=3, size=8)
    refused = storescu(strict_node.port, series.files, extra=anonymous(pki))
    assert refused.returncode != 0
    assert stored(strict_node, series) == 0
    wait_for(lambda: refusals(strict_node), 10, what="the refusal in the node's log")
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in refusals(strict_node)[-1]
    assert storescu(strict_node.port, series.files, extra=with_cert(pki)).returncode == 0
    assert stored(strict_node, series) == 3


# -- Orthanc with DICOM TLS as the PACS ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory, pki: Pki,
                node: NodeProcess) -> Iterator[OrthancServer]:
    """Orthanc 1.10 (DICOM TLS since 1.9.0) requiring client certificates; it reaches the node over TLS."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-tls"), node_port=node.port, lua_scripts=None,
                           extra={"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.orthanc.cert),
                                  "DicomTlsPrivateKey": str(pki.orthanc.key),
                                  "DicomTlsTrustedCertificates": str(pki.ca),
                                  "DicomTlsRemoteCertificateRequired": True})
    config = json.loads(server.config_path.read_text())
    config["DicomModalities"]["thighnode"]["UseDicomTls"] = True  # C-MOVE to the node over TLS
    server.config_path.write_text(json.dumps(config, indent=2))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def node_settings(tmp_path: Path, pki: Pki, orthanc: OrthancServer, ca: Path | None = None) -> Settings:
    """The node's side as ``serve`` would build it, pointed at the TLS Orthanc."""
    tls = TlsSettings(**tls_section(pki, ca_certificates=str(ca or pki.ca)))
    return Settings(storage_dir=tmp_path / "var", tls=tls,
                    pacs=PacsSettings(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port))


@requires_orthanc
@requires_dcmtk
def test_sender_echo_query_and_retrieve_with_orthanc_over_tls(tls_orthanc: OrthancServer, node: NodeProcess,
                                                              pki: Pki, tmp_path: Path) -> None:
    settings = node_settings(tmp_path, pki, tls_orthanc)
    assert echo(settings) == (True, f"C-ECHO ORTHANC@127.0.0.1:{tls_orthanc.dicom_port}: success")

    series = write_ct_series(tmp_path / "d", name="tls-d", n=4, size=8)
    results = send_files(settings, series.files)
    assert results == dict.fromkeys(series.files)  # every file stored (None = no error)
    assert tls_orthanc.lookup(series.sop_uids[0], "Instance") is not None

    studies = find_studies(settings, "NODE-TEST-1")
    assert series.study_uid in [s.study_instance_uid for s in studies]
    completed, failed = move_series(settings, series.study_uid, series.series_uid)  # Orthanc → node, TLS
    assert (completed, failed) == (4, 0)
    wait_for(lambda: stored(node, series) == 4, 10, what="the moved series at the node")


@requires_orthanc
def test_node_refuses_a_pacs_its_ca_did_not_sign(tls_orthanc: OrthancServer, pki: Pki,
                                                 tmp_path: Path) -> None:
    settings = node_settings(tmp_path, pki, tls_orthanc, ca=pki.rogue_ca)
    ok, message = echo(settings)
    assert not ok and "no association" in message
    series = write_ct_series(tmp_path / "e", name="tls-e", n=1, size=8)
    assert send_files(settings, series.files)[series.files[0]].startswith("no association")


@requires_orthanc
def test_dicomnode_echo_command_over_tls(tls_orthanc: OrthancServer, pki: Pki, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", {
        "storage_dir": str(tmp_path / "var"),
        "pacs": {"ae_title": tls_orthanc.aet, "host": "127.0.0.1", "port": tls_orthanc.dicom_port},
        "tls": tls_section(pki)})
    result = subprocess.run([sys.executable, "-m", "dicomnode.cli", "echo", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "success" in result.stdout, result.stdout + result.stderr


# -- configuration and contexts -----------------------------------------------------------------------
def write_config(tmp_path: Path, tls: dict[str, Any]) -> Path:
    return write_toml(tmp_path / "node.toml", {"tls": tls})


def test_missing_certificate_file_is_refused_by_name(tmp_path: Path, pki: Pki) -> None:
    config = write_config(tmp_path, tls_section(pki, certificate=str(tmp_path / "nope.pem")))
    with pytest.raises(ConfigError) as err:
        check_file(config)
    assert f"tls.certificate: no such file: {tmp_path / 'nope.pem'}" in str(err.value)


def test_files_are_checked_only_when_tls_is_on(tmp_path: Path) -> None:
    """A prepared but disabled section (certificates not installed yet) is valid."""
    missing = str(tmp_path / "later.pem")
    section = {"enabled": False, "certificate": missing, "private_key": missing, "ca_certificates": missing}
    assert check_file(write_config(tmp_path, section)).tls.enabled is False


def test_enabled_without_files_names_what_is_missing(tmp_path: Path, pki: Pki) -> None:
    """Every missing or absent file at once, each by its key (not one per attempt)."""
    config = write_config(tmp_path, {"enabled": True, "certificate": str(tmp_path / "nope.pem")})
    with pytest.raises(ConfigError) as err:
        check_file(config)
    assert "tls.certificate: no such file" in str(err.value)
    for key in ("private_key", "ca_certificates"):
        assert f"tls.{key}: enabled = true needs it (a PEM file path)" in str(err.value)


def test_tls_section_is_strict(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"tls\.min_version: must be '1\.2' or '1\.3'"):
        check_file(write_config(tmp_path, tls_section(pki, min_version="1.1")))
    with pytest.raises(ConfigError, match=r"tls\.verify: unknown key"):
        check_file(write_config(tmp_path, tls_section(pki, verify=True)))
    assert check_file(write_config(tmp_path, tls_section(pki, min_version=1.3))).tls.min_version == "1.3"


def test_contexts_follow_the_settings(pki: Pki) -> None:
    assert server_context(TlsSettings()) is None
    optional = server_context(TlsSettings(**tls_section(pki)))
    strict = tls_section(pki, require_client_certificate=True, min_version="1.3")
    required = server_context(TlsSettings(**strict))
    assert optional is not None and required is not None
    assert (optional.verify_mode, optional.minimum_version) == (ssl.CERT_OPTIONAL, ssl.TLSVersion.TLSv1_2)
    assert (required.verify_mode, required.minimum_version) == (ssl.CERT_REQUIRED, ssl.TLSVersion.TLSv1_3)
    settings = Settings(tls=TlsSettings(**tls_section(pki, check_hostname=False)))
    args = client_tls_args(settings)
    assert args is not None and args[1] == "127.0.0.1"
    assert (args[0].verify_mode, args[0].check_hostname) == (ssl.CERT_REQUIRED, False)
    assert all(c["protocol"] == "TLSv1.3" or "ECDHE" in c["name"] or "DHE" in c["name"]
               for c in args[0].get_ciphers())  # forward secrecy only


def test_a_key_that_is_not_the_certificates_stops_the_node_with_its_name(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="tls.ca_certificates .*node.key: cannot load"):
        server_context(TlsSettings(**tls_section(pki, ca_certificates=str(pki.node.key))))
    config = write_toml(tmp_path / "node.toml", {
        "storage_dir": str(tmp_path / "var"), "host": "127.0.0.1", "port": free_port(),
        "tls": tls_section(pki, private_key=str(pki.rogue.key))})
    result = subprocess.run([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot start: tls.certificate" in result.stderr and "rogue.key: cannot load" in result.stderr
    assert "Traceback" not in result.stderr

