"""Pure functions on LoRA factors and updates: no modules, no state.

Shapes: an update is a matrix delta (m x n) = scaling * B (m x r) @ A (r x n).
"""
from __future__ import annotations

import torch


def svd_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r factors (Eckart-Young) of `delta`: B (m x r), A (r x n) with B A ~= delta.

    The singular values are split evenly (B = U sqrt(S), A = sqrt(S) V^T) so neither factor dominates
    if training continues from them.
    """
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(r, S.numel())
    sqrt_s = S[:r].sqrt()
    return U[:, :r] * sqrt_s, sqrt_s[:, None] * Vh[:r]


def singular_values(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of scaling * B @ A, computed from the small r x r core (B: m x r, A: r x n).

    With B = Q_b R_b and A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T, so the spectrum is that of the
    r x r matrix R_b R_a^T: exact, and cheap even when m and n are large.
    """
    _, R_b = torch.linalg.qr(B.float())
    _, R_a = torch.linalg.qr(A.float().T)
    return torch.linalg.svdvals(R_b @ R_a.T) * abs(scaling)


def weighted_concat(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of sum_i w_i * scaling_i * B_i A_i, by stacking: B = [w_i s_i B_i], A = [A_i].

    Args:
        factors: (B_i (m x r_i), A_i (r_i x n), scaling_i) per adapter.
        weights: w_i per adapter.

    Returns:
        (B (m x sum r_i), A (sum r_i x n)), to be used with scaling 1.
    """
    B = torch.cat([w * s * B_i.float() for (B_i, _, s), w in zip(factors, weights)], dim=1)
    A = torch.cat([A_i.float() for (_, A_i, _) in factors], dim=0)
    return B, A
