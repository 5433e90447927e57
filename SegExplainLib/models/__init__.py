"""Models: networks, model cards, nnU-Net results folders, MONAI bundles, TorchScript and the sliding window.

Each kind of model opens as a pipeline (:class:`SegExplainLib.models.protocol.Pipeline`, opened by name with
:func:`SegExplainLib.models.pipelines.open_pipeline`). Imports only the engine.
"""
