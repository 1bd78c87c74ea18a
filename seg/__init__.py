"""Pure image computation: class list, phantoms, DICOM/NIfTI to Volume, preprocessing, models, measures.

Nothing in this package knows about networks, databases or processes.
"""
