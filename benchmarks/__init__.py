"""Benchmarks: scripts run as ``python benchmarks/NAME.py``; a test that checks one imports it as
``benchmarks.NAME`` (pytest puts the repository root on the path: ``pythonpath`` in pyproject.toml)."""
