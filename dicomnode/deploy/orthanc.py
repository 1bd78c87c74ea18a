"""Render the shipped Orthanc configuration for one site, test or container.

Why: ``orthanc.json`` (next to this module; ``deploy/orthanc/`` links to it) is the single source of
truth (ports, StableAge, routing hints); tests, the demo, the benchmark and the compose file only change
addresses and folders, so they all exercise the file an administrator deploys. Standard library only:
``deploy/orthanc/render.py`` runs it in the Orthanc container with the system ``python3``.

    python3 deploy/orthanc/render.py --node-host dicomnode --storage /var/lib/orthanc/db \
        --lua /etc/orthanc/thigh/route.lua --user "admin:$ORTHANC_ADMIN_PASSWORD" --dicomweb \
        --out /etc/orthanc/thigh/orthanc.json

The shipped file keeps HTTP authentication on with no users, so Orthanc answers every REST, Explorer
and DICOMweb request 401 until ``--user NAME:PASSWORD`` registers one; ``main`` warns when it renders
that. A file with users is written mode 0640 (Orthanc keeps the passwords in plain text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "orthanc.json"
ROUTE_LUA = HERE / "route.lua"
# Debian's orthanc-dicomweb (the viewer reads the PACS over DICOMweb); the first that exists is loaded
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",)


def dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin when installed, else None."""
    return next((p for p in DICOMWEB_PLUGINS if Path(p).is_file()), None)


def render(
    base: Path = BASE_CONFIG,
    *,
    aet: str | None = None,
    dicom_port: int | None = None,
    http_port: int | None = None,
    storage_dir: Path | str | None = None,
    node_aet: str | None = None,
    node_host: str | None = None,
    node_port: int | None = None,
    stable_age: int | None = None,
    lua_scripts: list[Path | str] | None = None,
    remote_access: bool | None = None,
    authentication: bool | None = None,
    plugins: list[Path | str] | None = None,
    users: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The base configuration with the given values replaced (None keeps the shipped value).

    ``plugins`` lists shared libraries to load, e.g. ``[dicomweb_plugin()]``; its ``DicomWeb`` section
    (``/dicom-web/``) is in the base file. ``users`` (name → password) are added to ``RegisteredUsers``,
    the HTTP Basic users of the REST API, Orthanc Explorer and DICOMweb.
    """
    cfg: dict[str, Any] = json.loads(Path(base).read_text())
    if aet is not None:
        cfg["DicomAet"] = aet
    if dicom_port is not None:
        cfg["DicomPort"] = int(dicom_port)
    if http_port is not None:
        cfg["HttpPort"] = int(http_port)
    if storage_dir is not None:
        cfg["StorageDirectory"] = str(storage_dir)
        cfg["IndexDirectory"] = str(storage_dir)
    node = cfg["DicomModalities"][cfg["ThighRouting"]["NodeModality"]]
    if node_aet is not None:
        node["AET"] = node_aet
        cfg["ThighRouting"]["NodeAets"] = [node_aet]
    if node_host is not None:
        node["Host"] = node_host
    if node_port is not None:
        node["Port"] = int(node_port)
    if stable_age is not None:
        cfg["StableAge"] = int(stable_age)
    if lua_scripts is not None:
        cfg["LuaScripts"] = [str(p) for p in lua_scripts]
    if remote_access is not None:
        cfg["RemoteAccessAllowed"] = bool(remote_access)
    if authentication is not None:
        cfg["AuthenticationEnabled"] = bool(authentication)
    if plugins is not None:
        cfg["Plugins"] = [str(p) for p in plugins]
    if users:
        cfg["RegisteredUsers"] = {**cfg.get("RegisteredUsers", {}), **users}
    for key, value in (extra or {}).items():
        cfg[key] = value
    return cfg


def write(cfg: dict[str, Any], path: Path) -> Path:
    """Write ``cfg`` as JSON; mode 0640 when it holds passwords (``RegisteredUsers``), else the umask's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cfg, indent=2) + "\n"
    if cfg.get("RegisteredUsers"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        os.fchmod(fd, 0o640)  # also narrows a file that existed with wider permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def parse_user(text: str) -> tuple[str, str]:
    """``NAME:PASSWORD`` (the password may contain ':') → (name, password); both must be non-empty."""
    name, sep, password = text.partition(":")
    if not sep or not name or name != name.strip() or not password:
        raise argparse.ArgumentTypeError("expected NAME:PASSWORD, both non-empty (value not shown)")
    return name, password


def _plugins(given: list[str] | None, dicomweb: bool) -> list[str] | None:
    found = dicomweb_plugin() if dicomweb else None
    if given is None and found is None:
        return None
    return [*(given or []), *([found] if found else [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--base", type=Path, default=BASE_CONFIG,
                    help="configuration to start from (default: the shipped orthanc.json)")
    ap.add_argument("--out", type=Path,
                    help="write here (default: stdout); mode 0640 when users are registered")
    ap.add_argument("--aet", help="Orthanc's own AE title, DicomAet (shipped: ORTHANC)")
    ap.add_argument("--dicom-port", type=int, help="Orthanc's DICOM port, DicomPort (shipped: 4242)")
    ap.add_argument("--http-port", type=int,
                    help="port of the REST API, Explorer and DICOMweb, HttpPort (shipped: 8042)")
    ap.add_argument("--storage", help="StorageDirectory and IndexDirectory")
    ap.add_argument("--node-aet", help="the node's AE title, also ThighRouting.NodeAets (shipped: THIGHNODE)")
    ap.add_argument("--node-host", help="host name or address of the node (shipped: 127.0.0.1)")
    ap.add_argument("--node-port", type=int, help="the node's DICOM port (shipped: 11112)")
    ap.add_argument("--stable-age", type=int,
                    help="seconds without a new instance before a series is routed, StableAge (shipped: 30)")
    ap.add_argument("--lua", action="append", help="Lua script path (repeatable; default: shipped path)")
    ap.add_argument("--remote-access", choices=["true", "false"],
                    help="RemoteAccessAllowed: HTTP from other hosts (shipped: false, localhost only)")
    ap.add_argument("--authentication", choices=["true", "false"],
                    help="AuthenticationEnabled: HTTP Basic auth for every request (shipped: true)")
    ap.add_argument("--user", action="append", type=parse_user, default=[], metavar="NAME:PASSWORD",
                    help="add an HTTP user to RegisteredUsers (repeatable); without one, authentication "
                         "refuses every request")
    ap.add_argument("--plugin", action="append", help="Orthanc plugin library to load (repeatable)")
    ap.add_argument("--dicomweb", action="store_true",
                    help=f"load the DICOMweb plugin ({DICOMWEB_PLUGINS[0]}, Debian package "
                         "orthanc-dicomweb); an error when it is not installed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="any top-level key, value as JSON (repeatable)")
    args = ap.parse_args(argv)
    if args.dicomweb and dicomweb_plugin() is None:
        ap.error(f"--dicomweb: no DICOMweb plugin at {', '.join(DICOMWEB_PLUGINS)} "
                 "(apt-get install orthanc-dicomweb, or name it with --plugin PATH)")
    extra = {}
    base_keys = set(json.loads(Path(args.base).read_text()))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--set {item!r}: give KEY=JSON, e.g. StableAge=10 or Name='\"Thigh PACS\"'")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            ap.error(f"--set {key}: {value!r} is not JSON (a text value needs quotes: {key}='\"{value}\"')")
        if key not in base_keys:  # Orthanc ignores a key it does not know, without a word
            print(f"warning: --set {key}: not a key of {args.base}; check its spelling against Orthanc's "
                  "configuration reference", file=sys.stderr)
    cfg = render(
        args.base, aet=args.aet, dicom_port=args.dicom_port, http_port=args.http_port,
        storage_dir=args.storage, node_aet=args.node_aet, node_host=args.node_host,
        node_port=args.node_port, stable_age=args.stable_age, lua_scripts=args.lua,
        remote_access=None if args.remote_access is None else args.remote_access == "true",
        authentication=None if args.authentication is None else args.authentication == "true",
        plugins=_plugins(args.plugin, args.dicomweb), users=dict(args.user), extra=extra,
    )
    locked = cfg.get("AuthenticationEnabled") and not cfg.get("RegisteredUsers")
    if locked and cfg.get("HttpServerEnabled", True):
        print("warning: AuthenticationEnabled with no RegisteredUsers: Orthanc will answer every HTTP "
              "request (REST API, Explorer, DICOMweb) 401; add --user NAME:PASSWORD", file=sys.stderr)
    if args.out:
        write(cfg, args.out)
    else:
        json.dump(cfg, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
