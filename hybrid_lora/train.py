"""One training loop for every method; two stages; the Stage-2 rank schedule; whole runs.

    run_experiment: build -> evaluate base on A and B -> Stage 1 on A -> evaluate A
                    -> Stage 2 on B (DC against the Stage-1 factors, rank rebuilds)
                    -> evaluate A again and B -> write config/history/metrics/adapters.

Runs checkpoint as they go (`checkpoint.py`); calling `run_experiment` again on the same
folder resumes from the latest checkpoint, or returns at once if the run is complete.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import (build_model, count_trainable_params, current_rank, flatten_factors,
                       load_adapter, load_tokenizer, lora_factors, rebuild_model_for_new_rank,
                       snapshot_factors)
from .checkpoint import (checkpoint_position, clear_checkpoints, load_checkpoint, save_adapter,
                         save_checkpoint, set_rng_state)
from .config import RUN_INDEPENDENT_FIELDS, STAGE2_FIELDS, ExperimentConfig
from .data import make_loaders
from .cl_losses import dc_delta_w, dc_per_module, module_vectors
from .evaluate import autocast, choose_amp_dtype, evaluate_loss_and_token_acc, model_device
from .losses import causal_lm_sums, domain_correlation_loss, ordering_penalty
from .methods import Method, get_method
from .nested import nested_training
from .ranks import sweep_run
from .results import (SCHEMA_VERSION, derived_metrics, read_json, run_dir, summary_row,
                      sweep_auc, write_json_atomic, write_summary)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_report(cfg: ExperimentConfig) -> str:
    """One line: the device a run of `cfg` uses and its precision (GPU name, or plainly CPU)."""
    device = resolve_device(cfg.device)
    amp = choose_amp_dtype(cfg.mixed_precision, device)
    precision = {None: "fp32", torch.float16: "fp16 autocast + GradScaler",
                 torch.bfloat16: "bf16 autocast"}[amp]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (f"GPU: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}); "
                f"{precision}, LoRA weights fp32")
    gpu = "a GPU is present but" if torch.cuda.is_available() else "no GPU found;"
    return f"Running on {device.type.upper()} ({gpu} device={cfg.device!r}); {precision}"


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _zero_sums(device: torch.device) -> dict:
    """The running sums of one epoch (device tensors: no host sync per step)."""
    return {"ce": torch.zeros((), dtype=torch.float64, device=device),
            "tokens": torch.zeros((), dtype=torch.long, device=device),
            "order": torch.zeros((), device=device), "dc": torch.zeros((), device=device),
            "steps": 0, "seconds": 0.0}


def _dc_term(variant: str, factors, stage1_factors, w_prev, rank: int, lam: float):
    """The DC loss of `variant` as a function of the live factors (set up once per build)."""
    if stage1_factors is None or not lam:
        return None
    if variant == "global":  # live vector: the gradient reaches the LoRA weights (defect 1)
        return lambda: domain_correlation_loss(w_prev, flatten_factors(factors), lam)
    if variant == "per_module":
        prev = module_vectors([(a[:rank], b[:, :rank]) for a, b in stage1_factors])  # once per build
        return lambda: dc_per_module(factors, prev, lam)
    return lambda: dc_delta_w(factors, stage1_factors, lam)  # B A of any rank


def _dc_probe(dc_term, factors) -> tuple[float, float]:
    """(DC value, norm of its gradient w.r.t. all LoRA weights) at the current weights: shows
    whether the term acts. Needs no forward pass of the model."""
    with torch.enable_grad():
        value = dc_term()
        grads = torch.autograd.grad(value, [t for ab in factors for t in ab])
    return value.item(), torch.sqrt(sum(g.double().square().sum() for g in grads)).item()


def train_stage(model, cfg: ExperimentConfig, method: Method, stage: int, train_loader, eval_loader,
                ranks: tuple[int, ...], stage1_factors=None, amp_dtype: torch.dtype | None = None,
                progress: bool = True, resume: dict | None = None, checkpoint=None):
    """Train one stage, one epoch per entry of `ranks`; returns (model, history rows).

    Before an epoch whose rank is below the model's, the model is rebuilt at that rank
    (scaling by `method.cut_scaling`) and gets a fresh optimizer. In the method's
    `nested_stages` each step trains one sampled rank (`nested.py`). The returned model may
    therefore be a new object: callers must use it. `stage1_factors` ([(A, B)] detached) enables
    the DC term (when the method has it in this stage) and the `cos_to_stage1` column.
    `amp_dtype` (from `choose_amp_dtype`) autocasts the forward pass only: the LoRA weights,
    the regularizers and the loss sums stay fp32; fp16 adds a GradScaler.
    `train_loader.sampler` must be an `EpochSampler` (each epoch's order rebuilt on its own).

    `checkpoint(model, position, state, rows)` is called every `cfg.checkpoint_every` steps
    and after each epoch. `resume` ({"epoch", "step", "rows", "state"} from such a call)
    continues from there: same batches, same optimizer/scaler state, same RNG stream.
    """
    lam_order, lam_dc = method.lambdas(cfg, stage)
    if lam_dc and stage1_factors is None:
        raise ValueError(f"method {method.name!r} uses DC in stage {stage} but no Stage-1 factors given")
    device = model_device(model)
    rebuild_scaling = {"preserve": "preserve", "dylora": "peft"}[method.cut_scaling(cfg)]
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, start_step, rows, saved_sums = 1, 0, [], None
    if resume is not None:
        start_epoch, start_step, rows = resume["epoch"], resume["step"], list(resume["rows"])
        state = resume["state"]
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        saved_sums = state.get("sums")
        # Restored last: nothing above draws random numbers on the uninterrupted path either.
        set_rng_state(state["rng"])

    def save(model, position, sums=None) -> None:
        state = {"optimizer": optimizer.state_dict()}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        if sums is not None:
            state["sums"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in sums.items()}
        checkpoint(model, position, state, rows)

    epochs = tqdm(ranks, desc=f"stage {stage} ({method.name})", unit="epoch", disable=not progress,
                  initial=start_epoch - 1)
    for epoch, rank in enumerate(ranks, 1):
        if epoch < start_epoch:
            continue
        if rank != current_rank(model):
            model = rebuild_model_for_new_rank(model, rank, cfg, scaling=rebuild_scaling)
            optimizer = make_optimizer(model, cfg)
        # Done once per (re)build, not per step: the live factor list and the frozen
        # Stage-1 vector cut to the current rank (so elements line up: defect 4).
        factors = [(a, b) for _, a, b, _ in lora_factors(model)]
        w_prev = flatten_factors(stage1_factors, rank) if stage1_factors is not None else None
        dc_term = _dc_term(cfg.dc_variant, factors, stage1_factors, w_prev, rank, lam_dc)
        skip = start_step if epoch == start_epoch else 0
        sums = _zero_sums(device)
        if skip and saved_sums is not None:
            sums = {k: v.to(device) if torch.is_tensor(v) else v for k, v in saved_sums.items()}
        train_loader.sampler.set_epoch(stage, epoch, skip * train_loader.batch_size)
        n_batches, step = skip + len(train_loader), skip
        start = time.perf_counter() - sums["seconds"]
        with nested_training(model, cfg, enabled=stage in method.nested_stages) as nest:
            model.train()
            batches = tqdm(train_loader, desc=f"epoch {epoch} r={rank}", leave=False, unit="batch",
                           disable=not progress, initial=skip, total=n_batches)
            for input_ids, attention_mask, labels in batches:
                input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                                     for t in (input_ids, attention_mask, labels))
                if nest is not None:  # DyLoRA: this step trains rank b only
                    nest.begin(nest.sample())
                with autocast(device, amp_dtype):
                    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                ce_b, n_b, _ = causal_lm_sums(logits, labels, with_hits=False)  # fp32 loss
                loss = ce_b / n_b.clamp(min=1)
                if lam_order:
                    order = lam_order * ordering_penalty(factors)
                    loss = loss + order
                    sums["order"] += order.detach()
                if lam_dc:
                    dc = dc_term()
                    loss = loss + dc
                    sums["dc"] += dc.detach()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # plain backward/step when the scaler is disabled
                scaler.step(optimizer)
                scaler.update()
                if nest is not None:
                    nest.end()
                sums["ce"] += ce_b.detach().double()
                sums["tokens"] += n_b
                sums["steps"] += 1
                step += 1
                if progress and step % 20 == 0:  # .item() syncs the device: only now and then
                    batches.set_postfix(ce=f"{(sums['ce'] / sums['tokens']).item():.3f}")
                if checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                        and step < n_batches:
                    sums["seconds"] = time.perf_counter() - start
                    save(model, (stage, epoch, step), sums)
            if nest is not None:
                nest.full()
            ev = evaluate_loss_and_token_acc(model, eval_loader, amp_dtype)
        cos = None
        if stage1_factors is not None:
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(
                    w_prev, flatten_factors(factors), dim=0).item()
        steps = max(sums["steps"], 1)
        dc_end, dc_grad = _dc_probe(dc_term, factors) if lam_dc else (None, None)
        rows.append({
            "stage": stage, "epoch": epoch, "rank": rank,
            "train_ce": (sums["ce"] / sums["tokens"].clamp(min=1)).item(),
            "train_order": sums["order"].item() / steps, "train_dc": sums["dc"].item() / steps,
            "eval_loss": ev["loss"], "eval_acc": ev["acc"], "cos_to_stage1": cos,
            "dc_end": dc_end, "dc_grad_norm": dc_grad,
            "trainable_params": count_trainable_params(model),
            "seconds": time.perf_counter() - start,
        })
        epochs.update()
        epochs.set_postfix(eval_loss=f"{ev['loss']:.3f}", eval_acc=f"{ev['acc']:.3f}")
        if checkpoint:
            save(model, (stage, epoch + 1, 0))
    epochs.close()
    return model, rows


def _final_eval(rows: list[dict], model, loader, amp_dtype) -> dict:
    """The current domain's evaluation after a stage: the last epoch's, or a fresh one."""
    if rows:
        return {"loss": rows[-1]["eval_loss"], "acc": rows[-1]["eval_acc"]}
    ev = evaluate_loss_and_token_acc(model, loader, amp_dtype)
    return {"loss": ev["loss"], "acc": ev["acc"]}


def check_same_run(run: Path, config: dict, ignore: tuple[str, ...] = ()) -> None:
    """Raise ValueError if `run/config.json` differs from `config` in a field that changes
    results (other than those in `ignore`)."""
    saved = read_json(run / "config.json")
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in config.items()
             if k not in RUN_INDEPENDENT_FIELDS + ignore and saved.get(k) != v]
    if diffs:
        raise ValueError(f"{run} holds a run made with other settings ({'; '.join(diffs)}). "
                         f"Use another output folder, or delete {run} to start it over.")


def run_experiment(cfg: ExperimentConfig, method: str, seed: int, out_dir: str | Path,
                   progress: bool = True, stop_after_stage: int | None = None) -> dict:
    """The whole two-stage run of `method` with `seed` in `<out_dir>/<method>/seed<seed>/`.

    Returns {"config", "history", "metrics", "complete"}; the first three as on disk.
    A complete run (metrics.json present) is returned without training; an interrupted
    one resumes from its latest checkpoint and ends with the same numbers as an
    uninterrupted run. `stop_after_stage=1` stops once the Stage-1 adapter is saved; a
    later call continues with Stage 2 and may change the Stage-2-only fields
    (`config.STAGE2_FIELDS`, e.g. lambda_dc) until Stage 2 has started. Domain A is evaluated right after Stage 1 and
    again, separately, after Stage 2 (defect 2 of the original measured both after Stage 2).
    """
    m = get_method(method)
    rd = run_dir(out_dir, method, seed)
    config = {**cfg.to_dict(), "method": method, "seed": seed, "schema_version": SCHEMA_VERSION}
    complete = (rd / "metrics.json").exists()
    if (rd / "config.json").exists():
        at_boundary = not complete and checkpoint_position(rd) == (2, 1, 0)
        check_same_run(rd, config, ignore=STAGE2_FIELDS if at_boundary else ())
    if complete:
        return {"config": read_json(rd / "config.json"), "history": read_json(rd / "history.json"),
                "metrics": read_json(rd / "metrics.json"), "complete": True}
    write_json_atomic(rd / "config.json", config)
    set_seed(seed)
    device = resolve_device(cfg.device)
    amp_dtype = choose_amp_dtype(cfg.mixed_precision, device)  # decided once for the run
    position, history, metrics, state = (1, 1, 0), [], {}, None
    found = load_checkpoint(rd, cfg, device)
    if found is None:
        model, tok = build_model(cfg, device, r=m.train_rank(cfg))
    else:
        (model, state, saved), tok = found, load_tokenizer(cfg)
        position, history, metrics = tuple(saved["position"]), saved["history"], saved["metrics"]
    loaders = [make_loaders(cfg, tok, domain, seed) for domain in cfg.domains]
    (train_a, eval_a), (train_b, eval_b) = loaders

    def ev(loader) -> dict:
        e = evaluate_loss_and_token_acc(model, loader, amp_dtype)
        return {"loss": e["loss"], "acc": e["acc"]}

    def checkpoint(model, pos, st, rows) -> None:
        done = [h for h in history if h["stage"] < pos[0]] + rows
        write_json_atomic(rd / "history.json", done)  # live history, for plotting mid-run
        save_checkpoint(rd, model, pos, st, {"history": done, "metrics": metrics})

    def result(complete: bool) -> dict:
        return {"config": config, "history": history, "metrics": metrics, "complete": complete}

    if stop_after_stage is not None and position[0] > stop_after_stage:
        return result(False)
    if not metrics:  # LoRA B starts at zero, so the fresh PEFT model computes the base model
        metrics.update(A_base=ev(eval_a), B_base=ev(eval_b))
    stage1 = None
    if position[0] == 2:  # resumed in Stage 2: the DC target comes from the saved adapter
        stage1 = snapshot_factors(load_adapter(cfg, rd / "adapter_stage1", device))
    plan = {1: (train_a, eval_a, m.stage_ranks(cfg, 1)), 2: (train_b, eval_b, m.stage_ranks(cfg, 2))}
    for stage, (train, evl, ranks) in plan.items():
        if stage < position[0]:
            continue
        resume = None
        if state is not None and stage == position[0]:
            resume = {"epoch": position[1], "step": position[2], "state": state,
                      "rows": [h for h in history if h["stage"] == stage]}
        model, rows = train_stage(model, cfg, m, stage, train, evl, ranks,
                                  stage1_factors=stage1 if stage == 2 else None,
                                  amp_dtype=amp_dtype, progress=progress, resume=resume,
                                  checkpoint=checkpoint)
        history[:] = [h for h in history if h["stage"] < stage] + rows
        if stage == 1:
            metrics["A_after_stage1"] = _final_eval(rows, model, eval_a, amp_dtype)
            save_adapter(model, rd / "adapter_stage1")
            stage1 = snapshot_factors(model)
            checkpoint(model, (2, 1, 0), {}, [])
            if stop_after_stage == 1:
                return result(False)
    metrics["B_after_stage2"] = _final_eval(rows, model, eval_b, amp_dtype)
    metrics["A_after_stage2"] = ev(eval_a)  # a new evaluation of the final model on A
    save_adapter(model, rd / "adapter_final")
    metrics = {k: metrics[k] for k in ("A_base", "B_base", "A_after_stage1", "A_after_stage2",
                                       "B_after_stage2")}
    metrics.update(derived_metrics(metrics))
    if cfg.sweep_ranks and cfg.sweep_kinds:  # every cut of both saved adapters, no training
        kinds = [(k, m.cut_scaling(cfg) if k == "slice" else "preserve") for k in cfg.sweep_kinds]
        del model  # the sweep loads both adapters back from disk
        sweep = sweep_run(rd, cfg, {"A": eval_a, "B": eval_b}, cfg.sweep_ranks, kinds, device,
                          amp_dtype, progress)
        metrics.update(rank_auc_stage1_A=sweep_auc(sweep, "stage1", "A"),
                       rank_auc_final_B=sweep_auc(sweep, "final", "B"))
    metrics["schema_version"] = SCHEMA_VERSION  # no timings here: same seed, same file
    write_json_atomic(rd / "history.json", history)
    write_json_atomic(rd / "metrics.json", metrics)  # written last: marks the run complete
    if not cfg.keep_checkpoints:
        clear_checkpoints(rd)
    return result(True)


def run_all(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True) -> list[dict]:
    """Every method in `cfg.methods` x seed in `cfg.seeds` (complete runs skipped, interrupted
    ones resumed); rebuilds summary.csv; returns its rows for these runs."""
    for method in cfg.methods:
        for seed in cfg.seeds:
            done = (run_dir(out_dir, method, seed) / "metrics.json").exists()
            if done and progress:
                tqdm.write(f"{method} seed {seed}: complete in {out_dir}, skipped")
            run_experiment(cfg, method, seed, out_dir, progress=progress)
    write_summary(out_dir)
    return [summary_row(run_dir(out_dir, mth, s)) for mth in cfg.methods for s in cfg.seeds]
