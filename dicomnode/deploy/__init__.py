"""Shipped deployment files that the code itself needs: Orthanc's configuration and routing script.

``deploy/orthanc/`` in the repository links here, so an administrator's copy and an installed package
(``pip install .``, no checkout) read the same ``orthanc.json`` and ``route.lua``.
"""
