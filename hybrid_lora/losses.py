"""Loss terms as functions of tensors (the `*_regularizer(model, ...)` wrappers only collect them).

- `causal_lm_sums`: shifted next-token cross-entropy and argmax hits, summed over labelled tokens.
- `ordering_penalty` / `ordering_regularizer`: the paper's eq. (2).
- `domain_correlation_loss`: the paper's eq. (3).
- continual-learning penalties and the other DC variants (`delta_w_l2`, `ewc_penalty`,
  `olora_penalty`, `dc_per_module`, `dc_delta_w`), as pure functions of LoRA factor tensors:
  `factors` are lists [(A [r, in], B [out, r]), ...] (one pair per module, e.g. from
  `adapters.lora_factors`); `prev` the same for the adapter after the previous stage (detached,
  possibly of another rank). delta W of a module is scaling * B A; these take the scaling per
  module where it matters and never form an [out, in] matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import lora_factors
from .data import IGNORE_INDEX


def causal_lm_sums(logits: torch.Tensor, labels: torch.Tensor, with_hits: bool = True):
    """(sum of CE in nats, number of labelled tokens, number of argmax hits or None), 0-d tensors.

    logits [B, T, V] predict labels [B, T] shifted by one; labels == -100 are ignored.
    Sums, not means, so callers can weight every token equally across batches.
    Training passes with_hits=False to skip the argmax it does not need.
    """
    logits = logits[:, :-1, :]          # [B, T-1, V]: position t predicts token t+1
    labels = labels[:, 1:]              # [B, T-1]
    mask = labels != IGNORE_INDEX
    ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    hits = ((logits.argmax(-1) == labels) & mask).sum() if with_hits else None
    return ce_sum, mask.sum(), hits


def order_weights(r: int, device=None, dtype=None) -> torch.Tensor:
    """w_i = i / (r - 1) for i = 1..r ([r]); for r = 1 the denominator is taken as 1, so w = [1]."""
    return torch.arange(1, r + 1, device=device, dtype=dtype) / max(r - 1, 1)


def ordering_penalty(factors) -> torch.Tensor:
    """sum over modules and components i of w_i * ||A_i||_2 * ||B_i||_2 (no lambda).

    factors: iterable of (A [r, in], B [out, r]); A_i is row i of A, B_i is column i of B.
    """
    total = None
    for a, b in factors:
        w = order_weights(a.shape[0], a.device, a.dtype)
        term = (w * a.norm(dim=1) * b.norm(dim=0)).sum()  # [r] -> scalar
        total = term if total is None else total + term
    return total


def ordering_regularizer(model, lam: float) -> torch.Tensor:
    """lam * ordering_penalty of every LoRA module of `model`; differentiable."""
    return lam * ordering_penalty((a, b) for _, a, b, _ in lora_factors(model))


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - cos(x, y) of two 1-D vectors, as ||x/|x| - y/|y|||^2 / 2 (1 where either is zero).

    The same function as 1 - F.cosine_similarity, but accurate in fp32 however close the
    vectors: a relative rounding error e of a norm scales 1 - cos by 1 + O(e) and adds only
    O(e^2). F.cosine_similarity's fp32 sums err by about 4e-4 in absolute terms at 7M
    elements (a rank-64 adapter of a 135M model), more than 1 - cos itself early in Stage 2.
    """
    nx, ny = x.norm(), y.norm()
    d = 0.5 * (x / nx.clamp(min=1e-30) - y / ny.clamp(min=1e-30)).square().sum()
    return torch.where((nx > 0) & (ny > 0), d, torch.ones_like(d))


def domain_correlation_loss(w_prev: torch.Tensor, w_cur: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * (1 - cos(w_prev, w_cur)) for 1-D vectors of equal length.

    `w_prev` is a constant (detached); the gradient flows into `w_cur`.
    """
    if w_prev.dim() != 1 or w_cur.dim() != 1:
        raise ValueError(f"domain_correlation_loss needs 1-D vectors, got shapes "
                         f"{tuple(w_prev.shape)} and {tuple(w_cur.shape)}")
    if w_prev.numel() != w_cur.numel():
        raise ValueError(f"domain_correlation_loss: length mismatch, w_prev has {w_prev.numel()} "
                         f"elements, w_cur has {w_cur.numel()} (truncate w_prev to the current rank)")
    return lam * cosine_distance(w_prev.detach(), w_cur)


def orthogonality_penalty(factors) -> torch.Tensor:
    """AdaLoRA's regularizer: the mean over all A [r, in] and B [out, r] of
    ||A A^T - I||_F and ||B^T B - I||_F (so that B diag(E) A stays an SVD)."""
    terms = []
    for a, b in factors:
        for gram in (a @ a.T, b.T @ b):  # [r, r]
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device)))
    return torch.stack(terms).mean()


# ----------------------------------------- continual-learning penalties, DC variants
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
    terms = [cosine_distance(cur, old) for cur, old in zip(module_vectors(factors), prev_vectors)]
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
