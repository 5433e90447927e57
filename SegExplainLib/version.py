"""The SegExplain version, recorded in every explanation (below every layer, like ``errors``)."""

__version__ = "0.1.0"
