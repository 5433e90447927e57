"""Cascading randomization: Spearman against scipy, the cascade's stages, the user's model untouched, and the known
answers (a map that ignores the weights fails, the gradient passes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_nets import EdgesMethod, blob_image
from testnets import frozen

import SegExplainLib as sx
from SegExplainLib.engine.api import METHODS
from SegExplainLib.engine.evaluation import evaluate, randomization


def test_spearman_matches_scipy_with_ties(rng):
    stats = pytest.importorskip("scipy.stats")
    a = rng.integers(0, 5, size=200).astype(float)  # many ties
    b = a + rng.normal(size=200)
    assert randomization.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, rel=1e-12)
    assert randomization.spearman(a, np.ones(200)) == 0.0


def test_the_cascade_randomizes_from_the_output_down_and_leaves_the_model_alone():
    model = frozen(sx.tiny_unet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = randomization.parameter_layers(model)
    trained = dict(model.named_modules())
    seen = 0
    for deepest, copy in randomization.cascade(model, 3, seed=0):
        assert copy is not model
        done = layers.index(deepest) + 1
        assert done > seen
        seen = done
        modules = dict(copy.named_modules())
        for index, name in enumerate(layers):  # randomized down to `deepest`, the layers below as trained
            changed = any(not torch.equal(p, q) for p, q in zip(modules[name].parameters(recurse=False),
                                                                trained[name].parameters(recurse=False)))
            assert changed == (index < done), (name, deepest)
    assert seen == len(layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_map_that_ignores_the_weights_fails_and_the_gradient_passes(monkeypatch):
    monkeypatch.setitem(METHODS, EdgesMethod.name, EdgesMethod)
    model = frozen(sx.tiny_unet().double())
    card = evaluate(model, blob_image(), sx.BoxTarget((2, 4, 4), (6, 8, 8)), [EdgesMethod.name, "gradient"],
                    scores=["randomization"], randomization_stages=2, device="cpu")
    edges, gradient = card.methods[EdgesMethod.name], card.methods["gradient"]
    assert [s["spearman"] for s in edges["randomization"]["stages"]] == pytest.approx([1.0, 1.0])
    assert not edges["randomization"]["passed"] and edges["verdict"].startswith("not trustworthy")
    assert gradient["randomization"]["passed"], gradient["randomization"]


def test_the_last_stage_is_the_same_network_whatever_the_number_of_stages():
    # the verdict reads the last stage only: fewer stages give the same verdict for fewer explanations
    model = frozen(sx.tiny_unet())
    last = {}
    for stages in (1, 2, 3):
        *_, (deepest, copy) = randomization.cascade(model, stages, seed=3)
        last[stages] = (deepest, {k: v.clone() for k, v in copy.state_dict().items()})
    for stages in (2, 3):
        assert last[stages][0] == last[1][0]
        assert all(torch.equal(v, last[1][1][k]) for k, v in last[stages][1].items())
