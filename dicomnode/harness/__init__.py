"""Test-and-demo harness: real peers and the small helpers around them, for the demo, tests and benchmarks.

Why in the package: ``dicomnode demo``, ``tests/`` and ``benchmarks/`` start the same peers (dcmtk's
storescp as a PACS, Debian's Orthanc with the shipped configuration, ``dicomnode serve`` as a process)
and send the same way; one copy here, imported as ``dicomnode.harness``, keeps them from drifting.

- :mod:`.net`: free ports, waiting, the ``TCP_NODELAY`` environment.
- :mod:`.tomlfile`: a small TOML writer for node configurations (``tomllib`` only reads).
- :mod:`.dcmtk`: dcmtk's ``storescp`` (the stand-in PACS), ``storescu``, ``echoscu``, resolved explicitly.
- :mod:`.scu`: pynetdicom senders (one association, Nagle off; byte-for-byte when asked), C-ECHO.
- :mod:`.capture`: a pynetdicom storage SCP that keeps what it receives (stand-in node or PACS).
- :mod:`.ingest`: instances into a store as the SCP files them, without the network.
- :mod:`.node`: ``dicomnode serve`` as a subprocess.
- :mod:`.orthanc`: Orthanc on free loopback ports with the shipped configuration (+ DICOMweb plugin).
- :mod:`.viewer`: OHIF's built app with ``/dicom-web`` proxied to Orthanc on one origin.
- :mod:`.series`: small synthetic CT series (pydicom only).

Only :mod:`.net` and :mod:`.tomlfile` are imported here: they need the standard library alone.
"""

from dicomnode.harness.net import dcmtk_env, free_port, port_open, stop_process, wait_for
from dicomnode.harness.tomlfile import toml_text, write_toml

__all__ = [
    "dcmtk_env",
    "free_port",
    "port_open",
    "stop_process",
    "toml_text",
    "wait_for",
    "write_toml",
]
