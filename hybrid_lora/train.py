"""One training loop for every method; two stages; the Stage-2 rank schedule; whole runs.

    run_experiment: build -> evaluate base on A and B -> Stage 1 on A -> evaluate A
                    -> Stage 2 on B (DC against the Stage-1 factors, rank rebuilds)
                    -> evaluate A again and B -> write config/history/metrics/adapters.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import (build_model, count_trainable_params, current_rank, flatten_factors,
                       lora_factors, rebuild_model_for_new_rank, snapshot_factors)
from .config import ExperimentConfig
from .data import make_loaders
from .evaluate import autocast, choose_amp_dtype, evaluate_loss_and_token_acc, model_device
from .losses import causal_lm_sums, domain_correlation_loss, ordering_penalty
from .methods import Method, get_method
from .results import (SCHEMA_VERSION, derived_metrics, run_dir, summary_row, write_json_atomic,
                      write_summary)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_stage(model, cfg: ExperimentConfig, method: Method, stage: int, train_loader, eval_loader,
                ranks: tuple[int, ...], stage1_factors=None, amp_dtype: torch.dtype | None = None,
                progress: bool = True):
    """Train one stage, one epoch per entry of `ranks`; returns (model, history rows).

    Before an epoch whose rank is below the model's, the model is rebuilt at that rank
    (`cfg.rebuild_scaling`) and gets a fresh optimizer. The returned model may therefore
    be a new object: callers must use it. `stage1_factors` ([(A, B)] detached) enables
    the DC term (when the method has it in this stage) and the `cos_to_stage1` column.
    `amp_dtype` (from `choose_amp_dtype`) autocasts the forward pass only: the LoRA weights,
    the regularizers and the loss sums stay fp32; fp16 adds a GradScaler.
    """
    lam_order, lam_dc = method.lambdas(cfg, stage)
    if lam_dc and stage1_factors is None:
        raise ValueError(f"method {method.name!r} uses DC in stage {stage} but no Stage-1 factors given")
    device = model_device(model)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    rows = []
    epochs = tqdm(ranks, desc=f"stage {stage} ({method.name})", unit="epoch", disable=not progress)
    for epoch, rank in enumerate(epochs, 1):
        if rank != current_rank(model):
            model = rebuild_model_for_new_rank(model, rank, cfg, scaling=cfg.rebuild_scaling)
            optimizer = make_optimizer(model, cfg)
        # Done once per (re)build, not per step: the live factor list and the frozen
        # Stage-1 vector cut to the current rank (so elements line up: defect 4).
        factors = [(a, b) for _, a, b, _ in lora_factors(model)]
        w_prev = flatten_factors(stage1_factors, rank) if stage1_factors is not None else None
        start = time.perf_counter()
        model.train()
        ce_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_tok = torch.zeros((), dtype=torch.long, device=device)
        order_sum = torch.zeros((), device=device)
        dc_sum = torch.zeros((), device=device)
        steps = 0
        batches = tqdm(train_loader, desc=f"epoch {epoch} r={rank}", leave=False, unit="batch",
                       disable=not progress)
        for input_ids, attention_mask, labels in batches:
            input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                                 for t in (input_ids, attention_mask, labels))
            with autocast(device, amp_dtype):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            ce_b, n_b, _ = causal_lm_sums(logits, labels, with_hits=False)  # fp32 loss
            loss = ce_b / n_b.clamp(min=1)
            if lam_order:
                order = lam_order * ordering_penalty(factors)
                loss = loss + order
                order_sum += order.detach()
            if lam_dc:
                # live vector: the gradient reaches the LoRA weights (defect 1)
                dc = domain_correlation_loss(w_prev, flatten_factors(factors), lam_dc)
                loss = loss + dc
                dc_sum += dc.detach()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # plain backward/step when the scaler is disabled
            scaler.step(optimizer)
            scaler.update()
            ce_sum += ce_b.detach().double()
            n_tok += n_b
            steps += 1
            if progress and steps % 20 == 0:  # .item() syncs the device: only now and then
                batches.set_postfix(ce=f"{(ce_sum / n_tok).item():.3f}")
        ev = evaluate_loss_and_token_acc(model, eval_loader, amp_dtype)
        cos = None
        if stage1_factors is not None:
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(
                    w_prev, flatten_factors(factors), dim=0).item()
        rows.append({
            "stage": stage, "epoch": epoch, "rank": rank,
            "train_ce": (ce_sum / n_tok.clamp(min=1)).item(),
            "train_order": order_sum.item() / max(steps, 1),
            "train_dc": dc_sum.item() / max(steps, 1),
            "eval_loss": ev["loss"], "eval_acc": ev["acc"], "cos_to_stage1": cos,
            "trainable_params": count_trainable_params(model),
            "seconds": time.perf_counter() - start,
        })
        epochs.set_postfix(eval_loss=f"{ev['loss']:.3f}", eval_acc=f"{ev['acc']:.3f}")
    return model, rows


def _final_eval(rows: list[dict], model, loader, amp_dtype) -> dict:
    """The current domain's evaluation after a stage: the last epoch's, or a fresh one."""
    if rows:
        return {"loss": rows[-1]["eval_loss"], "acc": rows[-1]["eval_acc"]}
    ev = evaluate_loss_and_token_acc(model, loader, amp_dtype)
    return {"loss": ev["loss"], "acc": ev["acc"]}


def run_experiment(cfg: ExperimentConfig, method: str, seed: int, out_dir: str | Path,
                   progress: bool = True) -> dict:
    """The whole two-stage run of `method` with `seed`; writes `<out_dir>/<method>/seed<seed>/`.

    Returns {"config": ..., "history": [...], "metrics": {...}} as written to disk.
    Domain A is evaluated right after Stage 1 and again, separately, after Stage 2
    (defect 2 of the original measured both after Stage 2).
    """
    m = get_method(method)
    rd = run_dir(out_dir, method, seed)
    config = {**cfg.to_dict(), "method": method, "seed": seed, "schema_version": SCHEMA_VERSION}
    write_json_atomic(rd / "config.json", config)
    set_seed(seed)
    device = resolve_device(cfg.device)
    amp_dtype = choose_amp_dtype(cfg.mixed_precision, device)  # decided once for the run
    model, tok = build_model(cfg, device)
    dom_a, dom_b = cfg.domains
    train_a, eval_a = make_loaders(cfg, tok, dom_a, seed)
    train_b, eval_b = make_loaders(cfg, tok, dom_b, seed)

    def ev(loader) -> dict:
        e = evaluate_loss_and_token_acc(model, loader, amp_dtype)
        return {"loss": e["loss"], "acc": e["acc"]}

    # LoRA B starts at zero, so the fresh PEFT model computes exactly the base model.
    metrics = {"A_base": ev(eval_a), "B_base": ev(eval_b)}
    model, hist1 = train_stage(model, cfg, m, 1, train_a, eval_a, (cfg.r,) * cfg.epochs_stage1,
                               amp_dtype=amp_dtype, progress=progress)
    metrics["A_after_stage1"] = _final_eval(hist1, model, eval_a, amp_dtype)
    model.save_pretrained(str(rd / "adapter_stage1"))
    stage1 = snapshot_factors(model)
    model, hist2 = train_stage(model, cfg, m, 2, train_b, eval_b, m.stage2_ranks(cfg),
                               stage1_factors=stage1, amp_dtype=amp_dtype, progress=progress)
    metrics["B_after_stage2"] = _final_eval(hist2, model, eval_b, amp_dtype)
    metrics["A_after_stage2"] = ev(eval_a)  # a new evaluation of the final model on A
    model.save_pretrained(str(rd / "adapter_final"))
    metrics = {k: metrics[k] for k in ("A_base", "B_base", "A_after_stage1", "A_after_stage2",
                                       "B_after_stage2")}
    metrics.update(derived_metrics(metrics))
    metrics["schema_version"] = SCHEMA_VERSION  # no timings here: same seed, same file
    history = hist1 + hist2
    write_json_atomic(rd / "history.json", history)
    write_json_atomic(rd / "metrics.json", metrics)  # written last: marks the run complete
    return {"config": config, "history": history, "metrics": metrics}


def run_all(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True) -> list[dict]:
    """Every method in `cfg.methods` x seed in `cfg.seeds`; rebuilds summary.csv; returns its rows."""
    for method in cfg.methods:
        for seed in cfg.seeds:
            run_experiment(cfg, method, seed, out_dir, progress=progress)
    write_summary(out_dir)
    return [summary_row(run_dir(out_dir, mth, s)) for mth in cfg.methods for s in cfg.seeds]

