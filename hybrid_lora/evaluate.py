"""Evaluation: next-token loss and accuracy, token-weighted over a whole loader."""
from __future__ import annotations

import torch

from .data import IGNORE_INDEX
from .distributed import gather_objects, shard, world


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def choose_amp_dtype(mode: str, device: torch.device, capability: tuple[int, int] | None = None):
    """The autocast dtype for `mode` on `device`, or None for plain fp32.

    "auto": None off CUDA; on CUDA bf16 when the GPU computes it natively (compute capability
    >= 8.0), else fp16 with a GradScaler. A T4 (7.5) says `is_bf16_supported()` through
    emulation, so the capability decides, not that call. "no": None. "fp16"/"bf16": as named.
    """
    if mode == "no":
        return None
    if mode in ("fp16", "bf16"):
        return torch.float16 if mode == "fp16" else torch.bfloat16
    if mode != "auto":
        raise ValueError(f"mixed_precision={mode!r}: must be auto, no, fp16 or bf16")
    if device.type != "cuda":
        return None
    major, _ = capability or torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: torch.device, amp_dtype):
    """torch.autocast for the forward pass; a no-op when amp_dtype is None."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def sequence_sums(logits: torch.Tensor, labels: torch.Tensor, block: int | None = None):
    """Per sequence (CE sum in nats [B] fp64, labelled tokens [B], argmax hits [B]); same shift
    and ignore rule as `causal_lm_sums`.

    One pass over the logits of labelled positions only (padding costs nothing): the labels are
    shifted instead of the logits, and each block of `block` positions gets its max, argmax and
    log-sum-exp while it is in cache (default: about 2 MB of fp32 logits on CPU, 256 MB on a GPU)."""
    b, t, v = logits.shape
    target = torch.full_like(labels, IGNORE_INDEX)  # [B, T]: position t predicts token t+1
    target[:, :-1] = labels[:, 1:]
    flat, y = logits.reshape(b * t, v), target.reshape(-1)  # a view: logits are contiguous
    mask = y != IGNORE_INDEX
    rows = mask.nonzero().squeeze(1)  # [N] labelled positions
    if block is None:
        block = max(1, (2**19 if logits.device.type == "cpu" else 2**26) // v)
    nll = torch.zeros(b * t, device=logits.device)
    hits = torch.zeros(b * t, dtype=torch.bool, device=logits.device)
    for s in range(0, len(rows), block):
        idx = rows[s:s + block]
        x = flat.index_select(0, idx).float()  # [block, V], a copy: changed in place below
        picked = x.gather(1, y[idx].unsqueeze(1)).squeeze(1)
        top, arg = x.max(-1)
        lse = top + x.sub_(top[:, None]).exp_().sum(-1).log_()  # log-sum-exp, stable
        nll[idx] = lse - picked
        hits[idx] = arg == y[idx]
    return nll.view(b, t).double().sum(1), mask.view(b, t).sum(1), hits.view(b, t).sum(1)


@torch.no_grad()
def evaluate_loss_and_token_acc(model: torch.nn.Module, loader, amp_dtype: torch.dtype | None = None,
                                per_sequence: bool = False) -> dict:
    """{"loss": mean CE per labelled token (nats), "acc": argmax accuracy, "tokens": count}.
    `per_sequence=True` adds "seq": {"nll", "tokens", "hits"}, lists with one entry per
    evaluation sequence in loader order (for bootstrap intervals over sequences).

    Every labelled token weighs the same, whatever batch it is in and however much
    padding that batch has (the original averaged per-batch means: defect 6). Runs in
    eval mode without gradients and restores the model's previous mode. With `amp_dtype`
    the forward pass runs under autocast; the loss is always summed in fp32/fp64. Leaves
    the global RNG as it found it (a loader without its own generator draws from it).
    """
    from .adapters import rng_isolated

    with rng_isolated():
        return _evaluate(model, loader, amp_dtype, per_sequence)


def _evaluate(model, loader, amp_dtype, per_sequence: bool) -> dict:
    was_training = model.training
    model.eval()
    device = model_device(model)
    parts = []  # per batch: (nll [b], tokens [b], hits [b]) of this process's rows, on device
    for batch in loader:
        input_ids, attention_mask, labels = (shard(t).to(device, non_blocking=True) for t in batch)
        if len(input_ids):  # several processes: a short last batch may leave one none
            with autocast(device, amp_dtype):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            parts.append(sequence_sums(logits, labels))  # no host sync per batch
        else:
            parts.append(tuple(torch.zeros(0, dtype=d, device=device)
                               for d in (torch.float64, torch.long, torch.long)))
    model.train(was_training)
    if not parts:
        raise ValueError("evaluation loader has no labelled tokens")
    nll, n, h = (torch.cat(x) for x in zip(*parts))  # [N] each, loader order
    if world()[1] > 1:  # every process's rows, batch by batch in rank order: loader order
        per_rank = gather_objects([tuple(t.cpu() for t in p) for p in parts])
        nll, n, h = (torch.cat([per_rank[r][i][j] for i in range(len(parts)) for r in range(len(per_rank))])
                     for j in range(3))
    n_tok = int(n.sum().item())
    if n_tok == 0:
        raise ValueError("evaluation loader has no labelled tokens")
    out = {"loss": nll.sum().item() / n_tok, "acc": h.sum().item() / n_tok, "tokens": n_tok}
    if per_sequence:
        out["seq"] = {"nll": nll.tolist(), "tokens": n.tolist(), "hits": h.tolist()}
    return out
