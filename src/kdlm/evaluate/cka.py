"""Linear centered kernel alignment (CKA, Kornblith et al., 2019) between two sets of representations.

For representations X (N, D1) and Y (N, D2) of the same N examples (here: tokens), with columns
centred, linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). It is 1 for X against itself, and
unchanged by an orthogonal transform or an isotropic scaling of either side, so layers of different
widths (a teacher and a narrower student) can be compared. Computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of x: (N, D1) and y: (N, D2), rows the same N examples."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same examples on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def _centred_gram(x: Tensor) -> Tensor:
    """The centred Gram matrix H X X^T H, scaled to unit Frobenius norm: (N, N) float64."""
    x = x.double() - x.double().mean(0, keepdim=True)
    gram = x @ x.T
    return gram / gram.norm()


def cka_matrix(first: list[Tensor], second: list[Tensor]) -> Tensor:
    """CKA of every pair (first[i], second[j]): (len(first), len(second)) float64.

    Through normalised centred Gram matrices: <K_c, L_c> / (|K_c| |L_c|) equals the feature-space
    formula of `linear_cka`, and costs N^2 per pair instead of N * D1 * D2 once the Grams are made.
    """
    grams = [_centred_gram(x) for x in second]
    out = torch.empty(len(first), len(second), dtype=torch.float64)
    for i, x in enumerate(first):
        gram = _centred_gram(x)
        for j, other in enumerate(grams):
            out[i, j] = (gram * other).sum()
    return out
