"""``segexplain review``: a local web app on trame-slicer to explain a case in Slicer's slice and 3D views.

:mod:`.session` holds the case in a Slicer scene and drives the Slicer module's MRML logic (``SegExplainMRML``);
:mod:`.app` is the trame page (views, controls, downloads). Import :func:`SegExplainReview.app.serve` to start it;
this package needs the ``review`` extra (``trame-slicer[standalone]``).
"""
