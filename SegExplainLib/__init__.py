"""SegExplainLib: explanations (LRP, Integrated Gradients and friends) for 3D medical segmentation networks."""

__version__ = "0.1.0"
