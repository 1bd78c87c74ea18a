#!/usr/bin/env python3
"""Render the shipped Orthanc configuration (CLI; the code is ``dicomnode.deploy.orthanc``).

    python3 deploy/orthanc/render.py --node-host dicomnode --storage /var/lib/orthanc/db \
        --lua /etc/orthanc/thigh/route.lua --out /etc/orthanc/thigh/orthanc.json

Runs with a plain ``python3`` (standard library only): where ``dicomnode`` is not installed, as in the
Orthanc container, it loads the module from this checkout by its file path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

MODULE = Path(__file__).resolve().parents[2] / "dicomnode" / "deploy" / "orthanc.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dicomnode_deploy_orthanc", MODULE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    raise SystemExit(_load().main())
