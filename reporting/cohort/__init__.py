"""Cohort analysis of every pre/post pair the node measured: the seed paper's tables, figures and statistics.

Not DICOM encoding (the rest of :mod:`reporting`): :mod:`.collect` turns pairing's entries into
per-patient and per-muscle frames (and says why a patient is left out), :mod:`.flow` counts the
participant flow, :mod:`.baseline` describes the groups (Table 0), :mod:`.statistics` computes the
tables and tests (:mod:`.ranktests` runs the rank tests and names how each p was computed),
:mod:`.figures` draws the figures, :mod:`.report` assembles and writes them (CSV, Excel, PNG, HTML).
"""
