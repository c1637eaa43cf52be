"""Evaluation: next-token loss and accuracy, token-weighted over a whole loader."""
from __future__ import annotations

import torch

from .losses import causal_lm_sums


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_loss_and_token_acc(model: torch.nn.Module, loader) -> dict:
    """{"loss": mean CE per labelled token (nats), "acc": argmax accuracy, "tokens": count}.

    Every labelled token weighs the same, whatever batch it is in and however much
    padding that batch has (the original averaged per-batch means: defect 6). Runs in
    eval mode without gradients and restores the model's previous mode.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    ce = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    hits = torch.zeros((), dtype=torch.long, device=device)
    for input_ids, attention_mask, labels in loader:
        input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                             for t in (input_ids, attention_mask, labels))
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        c, n, h = causal_lm_sums(logits, labels)
        ce += c.double()  # accumulate on device: no host sync per batch
        tokens += n
        hits += h
    model.train(was_training)
    n_tok = int(tokens.item())
    if n_tok == 0:
        raise ValueError("evaluation loader has no labelled tokens")
    return {"loss": ce.item() / n_tok, "acc": hits.item() / n_tok, "tokens": n_tok}
