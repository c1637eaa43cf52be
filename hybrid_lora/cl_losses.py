"""Continual-learning penalties and DC variants, as pure functions of LoRA factor tensors.

`factors` are lists [(A [r, in], B [out, r]), ...] (one pair per module, e.g. from
`adapters.lora_factors`); `prev` the same for the adapter after the previous stage (detached,
possibly of another rank). delta W of a module is scaling * B A; the functions below take the
scaling per module where it matters and never form an [out, in] matrix.
"""
from __future__ import annotations

import torch


def _inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F = tr(A1^T B1^T B2 A2) = sum((B1^T B2) * (A1 A2^T)); [r1, r2] products only."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def delta_w_l2(factors, prev, scalings, prev_scalings) -> torch.Tensor:
    """sum over modules of ||s B A - s0 B0 A0||_F^2, s the module's scaling in the live
    adapter and s0 in the previous one (they differ when the ranks or alphas do).

    Depends on B A only, so it is unchanged by B A -> (B G)(G^-1 A); penalising A and B
    separately would not be.
    """
    total = 0.0
    for (a, b), (a0, b0), s, s0 in zip(factors, prev, scalings, prev_scalings):
        total = total + (s * s * _inner(a, b, a, b) - 2 * s * s0 * _inner(a, b, a0, b0)
                         + s0 * s0 * _inner(a0, b0, a0, b0))
    return total


def ewc_penalty(theta: torch.Tensor, theta_prev: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """sum F * (theta - theta_prev)^2 over flat parameter vectors (diagonal Fisher, EWC)."""
    return (fisher * (theta - theta_prev).square()).sum()


def olora_penalty(a_new, a_old) -> torch.Tensor:
    """O-LoRA: sum over modules of ||A_old A_new^T||_F^2 (rows of the new A orthogonal to the old)."""
    return sum((ao @ an.T).square().sum() for an, ao in zip(a_new, a_old))


def module_vectors(factors) -> list[torch.Tensor]:
    """Each module's [A, B] as one 1-D vector (A row-major, then B); for a frozen adapter,
    make these once and pass them to `dc_per_module`."""
    return [torch.cat([a.reshape(-1), b.reshape(-1)]) for a, b in factors]


def dc_per_module(factors, prev_vectors, lam: float) -> torch.Tensor:
    """lam * mean over modules of (1 - cos) of that module's [A, B] vector against
    `prev_vectors` (`module_vectors` of the earlier adapter, cut to the same rank).
    The paper's global DC is `losses.domain_correlation_loss` on the whole flattened vector."""
    terms = [1 - torch.nn.functional.cosine_similarity(cur, old, dim=0)
             for cur, old in zip(module_vectors(factors), prev_vectors)]
    return lam * torch.stack(terms).mean()


def dc_delta_w(factors, prev, lam: float, eps: float = 1e-12) -> torch.Tensor:
    """lam * mean over modules of (1 - cos(B A, B0 A0)) in the Frobenius inner product:
    invariant to B A -> (B G)(G^-1 A), and defined across ranks."""
    terms = []
    for (a, b), (a0, b0) in zip(factors, prev):
        cross = _inner(a, b, a0, b0)
        norms = (_inner(a, b, a, b) * _inner(a0, b0, a0, b0)).clamp(min=eps).sqrt()
        terms.append(1 - cross / norms)
    return lam * torch.stack(terms).mean()
