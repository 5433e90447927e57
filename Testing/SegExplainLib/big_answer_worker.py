"""A worker child whose session answers every explanation with 128³ maps of six sequences, at once (no network).

``python big_answer_worker.py`` serves as ``python -m SegExplainLib.frontends.worker`` does, so that a test times the transport
of a large answer to the host, not an explanation. Each voxel of the maps holds its flat index modulo 2**20, so the
receiver can check every byte.
"""

from __future__ import annotations

import numpy as np

from SegExplainLib.frontends.worker import serving

SHAPE = (6, 128, 128, 128)


def expected_maps() -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.int64) % (1 << 20)).astype(np.float32).reshape(SHAPE)


class _Result:
    def __init__(self) -> None:
        self.maps = expected_maps()

    def record(self) -> dict:
        return {"method": "none"}


class BigAnswerSession:
    """A :class:`~SegExplainLib.frontends.worker.WarmSession` stand-in: no model, maps of :data:`SHAPE` for every request."""

    def __init__(self, model) -> None:
        self.source, self.sequences, self.description = model, [], {}
        self.preview = None  # no cheaper stand-in

    def set_case(self, image, geometry) -> dict:
        return {"shape": list(image.shape)}

    def explain(self, request, *, mask=None, preview=False) -> _Result:
        return _Result()

    def shown(self, *, preview) -> dict:
        return {}


if __name__ == "__main__":
    serving.WarmSession = BigAnswerSession
    serving.main()
