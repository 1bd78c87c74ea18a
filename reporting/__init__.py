"""DICOM objects (SEG, TID 1500 SR, summary) and cohort reports built from volumes and label maps."""
