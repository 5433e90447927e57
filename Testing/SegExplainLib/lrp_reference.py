"""Slow, obviously correct LRP: dense matrices of layers and the rules written out as in the papers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

EPS = 1e-6


def as_matrix(layer: nn.Module, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Dense (W, b) of an affine layer: b = layer(0), column i = layer(e_i) - b."""
    n = int(np.prod(in_shape))
    with torch.no_grad():
        bias = layer(torch.zeros((1, *in_shape), dtype=torch.float64)).flatten()
        basis = torch.eye(n, dtype=torch.float64).reshape((n, *in_shape))
        columns = layer(basis).reshape(n, -1) - bias
    return columns.T.numpy(), bias.numpy()


def stab(z: np.ndarray, eps: float = EPS) -> np.ndarray:
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def reference_layer(rule: str, W: np.ndarray, b: np.ndarray, x: np.ndarray, R: np.ndarray,
                    eps: float = EPS) -> np.ndarray:
    """Relevance of the inputs x of one affine layer z = W x + b, written out as in the LRP papers."""
    out = np.zeros_like(x)
    if rule == "epsilon":
        z = W @ x + b
        for j in range(W.shape[0]):
            out += x * W[j] * R[j] / stab(z[j], eps)
    elif rule == "z_plus":
        contrib = np.where(x[None] >= 0, np.clip(W, 0, None), np.clip(W, None, 0)) * x[None]  # positive parts
        z = contrib.sum(1)
        for j in range(W.shape[0]):
            out += contrib[j] * R[j] / stab(z[j])
    elif rule == "alpha2_beta1":
        contrib = W * x[None]
        pos, neg = np.clip(contrib, 0, None), np.clip(contrib, None, 0)
        for j in range(W.shape[0]):
            out += 2 * pos[j] * R[j] / stab(pos[j].sum()) - neg[j] * R[j] / stab(neg[j].sum())
    elif rule == "gamma":
        gamma = 0.25
        Wg = W + gamma * np.where(x[None] >= 0, np.clip(W, 0, None), np.clip(W, None, 0))
        contrib = Wg * x[None]
        z = contrib.sum(1) + b + gamma * np.clip(b, 0, None)
        for j in range(W.shape[0]):
            out += contrib[j] * R[j] / stab(z[j])
    elif rule == "flat":
        for j in range(W.shape[0]):
            support = (W[j] != 0).astype(float)
            out += support * R[j] / stab(support.sum())
    elif rule == "w_square":
        for j in range(W.shape[0]):
            out += W[j] ** 2 * R[j] / stab((W[j] ** 2).sum())
    elif rule == "z_box":
        low, high = -3.0 * np.ones_like(x), 3.0 * np.ones_like(x)
        for j in range(W.shape[0]):
            contrib = x * W[j] - low * np.clip(W[j], 0, None) - high * np.clip(W[j], None, 0)
            out += contrib * R[j] / stab(contrib.sum() + b[j])
    return out
