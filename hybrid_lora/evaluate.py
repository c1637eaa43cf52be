"""Evaluation: next-token loss and accuracy, token-weighted over a whole loader."""
from __future__ import annotations

import torch

from .data import IGNORE_INDEX
from .losses import causal_lm_sums


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


def sequence_sums(logits: torch.Tensor, labels: torch.Tensor):
    """Per sequence (CE sum in nats [B] fp64, labelled tokens [B], argmax hits [B]); same shift
    and ignore rule as `causal_lm_sums`."""
    logits, labels = logits[:, :-1, :], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    mask = labels != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels,
                                           ignore_index=IGNORE_INDEX, reduction="none")  # [B, T-1]
    return ce.double().sum(1), mask.sum(1), ((logits.argmax(-1) == labels) & mask).sum(1)


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
    ce = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    hits = torch.zeros((), dtype=torch.long, device=device)
    seq = []
    for input_ids, attention_mask, labels in loader:
        input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                             for t in (input_ids, attention_mask, labels))
        with autocast(device, amp_dtype):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        c, n, h = causal_lm_sums(logits, labels)
        ce += c.double()  # accumulate on device: no host sync per batch
        tokens += n
        hits += h
        if per_sequence:
            seq.append(sequence_sums(logits, labels))
    model.train(was_training)
    n_tok = int(tokens.item())
    if n_tok == 0:
        raise ValueError("evaluation loader has no labelled tokens")
    out = {"loss": ce.item() / n_tok, "acc": hits.item() / n_tok, "tokens": n_tok}
    if per_sequence:
        nll, n, h = (torch.cat(parts).tolist() for parts in zip(*seq))
        out["seq"] = {"nll": nll, "tokens": n, "hits": h}
    return out
