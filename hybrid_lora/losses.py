"""Loss terms as functions of tensors (the `*_regularizer(model, ...)` wrappers only collect them).

- `causal_lm_sums`: shifted next-token cross-entropy and argmax hits, summed over labelled tokens.
- `ordering_penalty` / `ordering_regularizer`: the paper's eq. (2).
- `domain_correlation_loss`: the paper's eq. (3).
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
    return lam * (1.0 - F.cosine_similarity(w_prev.detach(), w_cur, dim=0))


def orthogonality_penalty(factors) -> torch.Tensor:
    """AdaLoRA's regularizer: the mean over all A [r, in] and B [out, r] of
    ||A A^T - I||_F and ||B^T B - I||_F (so that B diag(E) A stays an SVD)."""
    terms = []
    for a, b in factors:
        for gram in (a @ a.T, b.T @ b):  # [r, r]
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device)))
    return torch.stack(terms).mean()
