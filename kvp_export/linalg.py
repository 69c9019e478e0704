"""Ridge regression from accumulated moments, shared by healing and the predictor fit."""

from __future__ import annotations

import torch


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, alpha: float, unpenalized: int = 0) -> torch.Tensor:
    """argmin_W ||XW - Y||^2 + lam ||W||^2 from X^T X and X^T Y (float64).

    lam = alpha * mean diagonal of X^T X, so alpha is scale-free; the last `unpenalized`
    rows of W (a bias column) are not shrunk.
    """
    d = xtx.shape[0] - unpenalized
    lam = alpha * float(xtx.diagonal()[:d].mean())
    reg = torch.zeros_like(xtx)
    reg.diagonal()[:d] = lam
    return torch.linalg.solve(xtx + reg, xty)


def sse(w: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, yty: float) -> float:
    """||XW - Y||^2 from the moments alone (for choosing alpha on a held-out split)."""
    return float((w * (xtx @ w)).sum() - 2 * (w * xty).sum() + yty)


def choose_alpha(fit: tuple, val: tuple, alphas, unpenalized: int = 0) -> tuple[float, float]:
    """(alpha, held-out SSE) minimising the validation error; fit/val = (xtx, xty, yty)."""
    scored = [(sse(ridge_solve(fit[0], fit[1], a, unpenalized), *val), a) for a in alphas]
    err, alpha = min(scored)
    return alpha, err
