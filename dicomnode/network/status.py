"""The DIMSE statuses the node answers a request with (PS3.4 Annex B and GG, PS3.7 Annex C).

Why here: the SCP, the instance validator and the store each named the ones they use, the store one
of them twice over; the SCP passes the validator's and the store's status on as is, so they must be
the same numbers. Plain ints: pynetdicom and the hand-encoded response take them as they are.
"""

from __future__ import annotations

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # transient (disk low or failing, index busy, over max_instance_mb): send later
DATA_SET_DOES_NOT_MATCH = 0xA900  # another SOP class or Modality, a Type 1 UID missing, another SOP UID
CANNOT_UNDERSTAND = 0xC000  # a byte stream that does not parse; a UID collision
SOP_CLASS_NOT_SUPPORTED = 0x0122  # "Refused: SOP Class not supported": a request not served (C-FIND, N-*)
