"""The engine: ``explain``, targets, the ``Explanation`` record, the methods and the LRP rules.

It works on tensors and arrays only; it knows nothing of files, models on disk or front ends, and imports no other
layer of SegExplainLib (``SegExplainLib.errors`` is shared by all).
"""
