"""The front ends of the library: the command line, the warm worker process and the Ray cohort driver.

The Slicer module's logic (``SegExplainMRML``) and the browser review app (``SegExplainReview``) are front ends too,
in their own packages; nothing in SegExplainLib imports them.
"""
