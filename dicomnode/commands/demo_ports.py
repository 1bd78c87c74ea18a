"""The demo's TCP ports: each one an administrator chose (an option of ``dicomnode demo``) or, by
default, a free one the OS picks.

Why: on a PACS host the usual ports (4242, 8042, 11112) are taken, and one who tries the demo there
may still want to know where Orthanc or the viewer listens (a firewall rule, an SSH tunnel). A chosen
port that is taken is refused before anything starts, by the option that moves it, instead of an
Orthanc that does not start and a log to read.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomnode.harness.net import free_port, port_problem


@dataclass(frozen=True)
class DemoPorts:
    """The loopback ports of the demo's listeners (Orthanc's two only when Orthanc is the PACS)."""

    node: int  # the node's DICOM listener (its node.toml ``port``)
    pacs: int  # the PACS's DICOM port: Orthanc's, or the local store SCP's
    orthanc_http: int  # Orthanc's REST API and Explorer
    viewer: int  # the OHIF viewer in front of Orthanc's DICOMweb (``--view``)


OPTIONS = {"node": "--node-port", "pacs": "--pacs-port", "orthanc_http": "--orthanc-http-port",
           "viewer": "--viewer-port"}


class PortError(ValueError):
    """A chosen port the demo cannot use; the message names the option that moves it."""


def claim_ports(node: int | None = None, pacs: int | None = None, orthanc_http: int | None = None,
                viewer: int | None = None) -> DemoPorts:
    """Each chosen port checked (free now, none chosen twice), every other one a free port.

    Raises PortError for the first problem.
    """
    chosen = {"node": node, "pacs": pacs, "orthanc_http": orthanc_http, "viewer": viewer}
    given = {name: port for name, port in chosen.items() if port is not None}
    seen: dict[int, str] = {}
    for name, port in given.items():
        if port in seen:
            raise PortError(f"{OPTIONS[seen[port]]} and {OPTIONS[name]} are both {port}: "
                            "give each its own port")
        seen[port] = name
        if (problem := port_problem(port)) is not None:
            raise PortError(f"port {port} is {problem}: choose another with {OPTIONS[name]}")
    taken = set(seen)
    for name in chosen.keys() - given.keys():
        given[name] = free_port(avoid=taken)
        taken.add(given[name])
    return DemoPorts(**given)
