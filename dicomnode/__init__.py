"""The DICOM node: configuration, networking, store, queue, worker, sender, pairing and CLI."""

__version__ = "0.1.0"
