"""Synthetic thigh CT phantoms with exact ground truth (labels and volumes).

``make_phantom(opts)`` renders CT + labels; ``write_phantom(ph, out_dir)`` writes the DICOM series
and ``truth/``. Every test, benchmark and the demo relies on these; nothing is downloaded.
"""

from seg.phantom.options import PHANTOM_VERSION, Phantom, PhantomOptions
from seg.phantom.render import make_phantom
from seg.phantom.writer import TRANSFER_SYNTAXES, write_phantom

__all__ = ["PHANTOM_VERSION", "Phantom", "PhantomOptions", "TRANSFER_SYNTAXES", "make_phantom",
           "write_phantom"]
