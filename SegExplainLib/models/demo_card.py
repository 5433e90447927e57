"""The shipped demo network: its model card and weights in ``SegExplainLib/Resources/demo/``.

Written by ``python -m SegExplainLib.application.demo train``; every front end falls back on this card when the user
names no model.
"""

from __future__ import annotations

from pathlib import Path

#: The folder of the shipped demo network's card and weights.
DEMO_RESOURCES = Path(__file__).resolve().parents[1] / "Resources" / "demo"
DEMO_WEIGHTS_NAME = "demo_unet.safetensors"
DEMO_CARD_NAME = "card.json"


def demo_card_path() -> Path:
    """The model card of the shipped demo network: ``SegExplainLib/Resources/demo/card.json``."""
    return DEMO_RESOURCES / DEMO_CARD_NAME
