"""Models: networks, model cards, nnU-Net results folders, MONAI bundles, TorchScript and the sliding window.

Each kind of model opens as a pipeline (:class:`SegExplainLib.models.pipelines.Pipeline`). Imports only the engine.
"""
