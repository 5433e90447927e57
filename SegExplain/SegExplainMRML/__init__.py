"""The MRML side of the SegExplain Slicer module, free of Qt so that it runs in Slicer and headless alike.

Everything here works on a ``vtkMRMLScene`` with Slicer's real MRML and logic classes: inside the Slicer application
(through ``SegExplain.py``), in the browser review app (trame-slicer) and in the test suite (``slicer-core`` from
PyPI). Nothing imports ``qt``, ``ctk`` or ``slicer.app``; the Slicer-only parts (dialogs, timers, the layout
screenshot) live in the module file.

- :mod:`.nodes`: volumes to arrays and back with their geometry; segments, ROI boxes and clicked points as regions.
- :mod:`.display`: the diverging colour table, overlays on slice views, live amplitude filters.
- :mod:`.job`: the warm background worker that answers each click (model and case loaded once), with progress
  and cancel.
- :mod:`.results`: explanations as subject-hierarchy folders with their record, share tables, charts, inclusivity.
- :mod:`.export`: slice-view captures, slice montages and the one-page report.
"""
