"""Networks with known answers for the evaluation tests: what they read, where they can look."""

from __future__ import annotations

import torch
from testnets import frozen
from torch import nn

from SegExplainLib.engine.method import AttributionMethod, AttributionOutput


def one_sequence_net(channels: int = 2, read: int = 0) -> nn.Module:
    """Two classes; the lesion logit is a smoothed copy of sequence ``read`` minus 0.5, the background its negative:
    the network reads that sequence only, through a 3 x 3 x 3 field."""
    torch.manual_seed(0)
    conv = nn.Conv3d(channels, 4, 3, padding=1)
    head = nn.Conv3d(4, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, read] = 1.0 / 27 * torch.tensor([1.0, 1.2, 0.8, 1.1]).reshape(4, 1, 1, 1)
        conv.bias.fill_(0.1)
        head.weight.zero_()
        head.weight[1, :, 0, 0, 0] = 1.0
        head.weight[0, :, 0, 0, 0] = -1.0
        head.bias.copy_(torch.tensor([1.0, -1.0]))
    return frozen(nn.Sequential(conv, nn.ReLU(), head).double())


def blob_image(channels: int = 2, shape: tuple[int, int, int] = (8, 12, 12), seed: int = 0) -> torch.Tensor:
    """A bright ball in every sequence over a dim noisy background."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    centre = torch.tensor([n / 2 for n in shape], dtype=torch.float64).reshape(3, 1, 1, 1)
    ball = (((grid - centre) ** 2).sum(0) < 9).double()
    noise = 0.05 * torch.randn((channels, *shape), generator=generator, dtype=torch.float64)
    return ball.expand(channels, *shape) + noise


class EdgesMethod(AttributionMethod):
    """A "method" that ignores the network: the image's edges (the magnitude of its finite differences)."""

    name = "test_edges"
    seed_local = True

    def attribute(self, model, inputs, seed):
        edges = torch.zeros_like(inputs)
        for axis in (2, 3, 4):
            edges = edges + torch.diff(inputs, dim=axis, append=inputs.narrow(axis, -1, 1)).abs()
        return AttributionOutput(edges)

    def options(self):
        return {}


class RandomMethod(AttributionMethod):
    """A "method" whose map is seeded noise: its order of the voxels is random."""

    name = "test_random"
    seed_local = True

    def __init__(self, seed: int = 123):
        self.seed = seed

    def attribute(self, model, inputs, seed):
        generator = torch.Generator().manual_seed(self.seed)
        return AttributionOutput(torch.rand(inputs.shape, generator=generator, dtype=inputs.dtype))

    def options(self):
        return {"seed": self.seed}
