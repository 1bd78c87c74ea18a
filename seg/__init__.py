"""Pure image computation: class list, phantoms, DICOM/NIfTI to Volume, preprocessing, models, measures.

Nothing in this package knows about networks, databases or processes.
"""

import os

# torch's CPU allocator returns every large activation to the kernel and faults it in again (hundreds
# of thousands of page faults per UNETR window, a third of the CPU time in the kernel). Transparent
# huge pages for its large blocks cut sliding-window inference time by 15-20 % on CPU. Read once, at
# torch's first allocation, so it is set here before any seg module imports torch; set
# THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
