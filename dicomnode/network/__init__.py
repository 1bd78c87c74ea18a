"""DICOM networking: the C-STORE SCP and its receive processes, the sender, retrieve, TLS,
SOP classes, validation of what arrives."""
