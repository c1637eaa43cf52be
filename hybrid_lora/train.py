"""One training loop for every method; a sequence of stages; the Stage-2 rank schedule; runs.

    run_experiment: build -> evaluate the base on every domain (R row 0)
                    -> for each stage t: set up the method's references to the adapters of
                       earlier stages (`continual.py`) -> train on domain t (DC / penalty,
                       rank rebuilds) -> evaluate every domain (R row t) -> save the adapter
                    -> write config/history/metrics/eval_sequences.

Runs checkpoint as they go (`checkpoint.py`); calling `run_experiment` again on the same
folder resumes from the latest checkpoint, or returns at once if the run is complete.
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import (build_model, count_trainable_params, current_rank, flatten_factors,
                       load_adapter, load_tokenizer, lora_factors, rebuild_model_for_new_rank)
from .checkpoint import (checkpoint_position, clear_checkpoints, copy_dir, load_checkpoint,
                         save_adapter, save_checkpoint, set_rng_state)
from .cl_results import sweep_name
from .config import METHOD_NAMES, RUN_INDEPENDENT_FIELDS, STAGE2_FIELDS, ExperimentConfig
from .continual import StageReference, adapter_dir, regularizer_terms, stage_model, stage_reference
from .data import make_loaders, stage_train_set, train_loader
from .evaluate import autocast, choose_amp_dtype, evaluate_loss_and_token_acc, model_device
from .losses import causal_lm_sums, ordering_penalty
from .methods import LAMBDA_FIELDS, Method, get_method
from .nested import nested_training
from .ranks import sweep_run
from .results import (SCHEMA_VERSION, SEQUENCES_FILE, STAGE1_FILE, read_json, run_dir, run_metrics,
                      summary_row, two_domain_evals, write_json_atomic, write_summary)
from .sweep_results import sweep_aucs


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
            "penalty": torch.zeros((), device=device),
            "steps": 0, "seconds": 0.0}


def _probe(term, factors) -> tuple[float, float]:
    """(value, norm of its gradient w.r.t. all LoRA weights) of a regularizer term at the
    current weights: shows whether the term acts. Needs no forward pass of the model."""
    with torch.enable_grad():
        value = term()
        grads = torch.autograd.grad(value, [t for ab in factors for t in ab], allow_unused=True)
    return value.item(), torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)).item()


def train_stage(model, cfg: ExperimentConfig, method: Method, stage: int, train_loader, eval_loader,
                ranks: tuple[int, ...], reference: StageReference | None = None,
                amp_dtype: torch.dtype | None = None,
                progress: bool = True, resume: dict | None = None, checkpoint=None):
    """Train one stage, one epoch per entry of `ranks`; returns (model, history rows).

    Before an epoch whose rank is below the model's, the model is rebuilt at that rank
    (scaling by `method.cut_scaling`) and gets a fresh optimizer. A `method.nested` method
    trains one sampled rank per step (`nested.py`). The returned model may therefore be a new
    object: callers must use it. `reference` (`continual.stage_reference`: the adapter after
    the previous stage, EWC Fisher, earlier A matrices) enables the method's DC and penalty
    terms in this stage and, for a continued adapter, the `cos_to_stage1` column.
    `amp_dtype` (from `choose_amp_dtype`) autocasts the forward pass only: the LoRA weights,
    the regularizers and the loss sums stay fp32; fp16 adds a GradScaler.
    `train_loader.sampler` must be an `EpochSampler` (each epoch's order rebuilt on its own).

    `checkpoint(model, position, state, rows)` is called every `cfg.checkpoint_every` steps
    and after each epoch. `resume` ({"epoch", "step", "rows", "state"} from such a call)
    continues from there: same batches, same optimizer/scaler state, same RNG stream.
    """
    lam_order, lam_dc = method.lambdas(cfg, stage)
    if (lam_dc or method.penalty_lambda(cfg, stage)) and reference is None:
        raise ValueError(f"method {method.name!r} regularizes stage {stage} against the previous "
                         "adapter, but no reference was given")
    cos_ref = reference if reference is not None and method.adapter == "continue" else None
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
        # previous-stage vectors cut to the current rank (so elements line up: defect 4).
        factors = [(a, b) for _, a, b, _ in lora_factors(model)]
        scalings = [s for *_, s in lora_factors(model)]
        w_prev = flatten_factors(cos_ref.factors, rank) if cos_ref is not None else None
        terms = regularizer_terms(cfg, method, stage, factors, rank, reference, scalings)
        skip = start_step if epoch == start_epoch else 0
        sums = _zero_sums(device)
        if skip and saved_sums is not None:
            sums = {k: v.to(device) if torch.is_tensor(v) else v for k, v in saved_sums.items()}
        train_loader.sampler.set_epoch(stage, epoch, skip * train_loader.batch_size)
        n_batches, step = skip + len(train_loader), skip
        start = time.perf_counter() - sums["seconds"]
        with nested_training(model, cfg, enabled=method.nested) as nest:
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
                for name, term in terms.items():  # "dc", "penalty"
                    value = term()
                    loss = loss + value
                    sums[name] += value.detach()
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
        if w_prev is not None:
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(
                    w_prev, flatten_factors(factors), dim=0).item()
        steps = max(sums["steps"], 1)
        dc_end, dc_grad = _probe(terms["dc"], factors) if "dc" in terms else (None, None)
        pen_end, pen_grad = _probe(terms["penalty"], factors) if "penalty" in terms else (None, None)
        rows.append({
            "stage": stage, "epoch": epoch, "rank": rank,
            "train_ce": (sums["ce"] / sums["tokens"].clamp(min=1)).item(),
            "train_order": sums["order"].item() / steps, "train_dc": sums["dc"].item() / steps,
            "train_penalty": sums["penalty"].item() / steps,
            "eval_loss": ev["loss"], "eval_acc": ev["acc"], "cos_to_stage1": cos,
            "dc_end": dc_end, "dc_grad_norm": dc_grad,
            "penalty_end": pen_end, "penalty_grad_norm": pen_grad,
            "trainable_params": count_trainable_params(model),
            "seconds": time.perf_counter() - start,
        })
        epochs.update()
        epochs.set_postfix(eval_loss=f"{ev['loss']:.3f}", eval_acc=f"{ev['acc']:.3f}")
        if checkpoint:
            save(model, (stage, epoch + 1, 0))
    epochs.close()
    return model, rows


def check_same_run(run: Path, config: dict, ignore: tuple[str, ...] = ()) -> None:
    """Raise ValueError if `run/config.json` differs from `config` in a field that changes
    results (other than those in `ignore`)."""
    saved = read_json(run / "config.json")
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in config.items()
             if k not in RUN_INDEPENDENT_FIELDS + ignore and saved.get(k) != v]
    if diffs:
        raise ValueError(f"{run} holds a run made with other settings ({'; '.join(diffs)}). "
                         f"Use another output folder, or delete {run} to start it over.")


def stage_seed(seed: int, stage: int, stream: int = 0) -> int:
    """The seed a stage >= 2 starts from (stream 0): later stages do not depend on how many
    random numbers earlier stages drew, so runs with the same Stage 1 can share it. Stream 1
    seeds the random init of a new adapter (`continual.stage_model`) apart from training."""
    key = [seed, stage] + ([stream] if stream else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def stage1_key(cfg: ExperimentConfig, method: Method, seed: int) -> dict:
    """Everything Stage 1 (and the evaluations after it) depends on."""
    skip = set(STAGE2_FIELDS + RUN_INDEPENDENT_FIELDS)
    return {"config": {k: v for k, v in cfg.to_dict().items() if k not in skip},
            "method": list(method.stage1_signature()), "seed": seed, "schema_version": SCHEMA_VERSION}


def _shared_stage1(out_dir: Path, rd: Path, key: dict) -> Path | None:
    """Another run folder under `out_dir` whose finished Stage 1 has this key, or None."""
    for path in sorted(Path(out_dir).glob(f"*/seed{key['seed']}/{STAGE1_FILE}")):
        # a stage1.json without its adapter (adapters are not committed) cannot be shared
        if path.parent != rd and (path.parent / "adapter_stage1").is_dir() and read_json(path)["key"] == key:
            return path.parent
    return None


def run_experiment(cfg: ExperimentConfig, method: str, seed: int, out_dir: str | Path,
                   progress: bool = True, stop_after_stage: int | None = None,
                   name: str | None = None) -> dict:
    """The whole run of `method` with `seed` over `cfg.domains` in `<out_dir>/<name>/seed<seed>/`
    (`name` defaults to the method; lambda sweeps use e.g. "dc_lam1").

    Stage t trains on domain t; after every stage (and before the first: t = 0) the model is
    evaluated on every domain, giving the R matrix of `results.cl_metrics` (defect 2 of the
    original evaluated the first domain only after the last stage). Returns {"config",
    "history", "metrics", "complete"}, as on disk. A complete run (metrics.json present) is
    returned without training; an interrupted one resumes from its latest checkpoint and ends
    with the same numbers. `stop_after_stage=1` stops once the Stage-1 adapter is saved; a
    later call may change the later-stage fields (`config.STAGE2_FIELDS`, e.g. lambda_dc)
    until Stage 2 has started. With `cfg.share_stage1`, a run whose Stage 1 is identical to a
    finished one in the same `out_dir` copies it (same numbers as training it again).
    """
    m = get_method(method)
    rd = run_dir(out_dir, name or method, seed)
    n_stages = len(cfg.domains)
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
    key = stage1_key(cfg, m, seed)
    position, history, evals, val_evals, state = (1, 1, 0), [], [], [], None
    found = load_checkpoint(rd, cfg, device)
    donor = _shared_stage1(out_dir, rd, key) if found is None and cfg.share_stage1 else None
    if found is not None:
        (model, state, saved), tok = found, load_tokenizer(cfg)
        position, history, evals = tuple(saved["position"]), saved["history"], saved["evals"]
        val_evals = saved.get("val_evals", [])
    elif donor is not None:  # Stage 1 done elsewhere: take its adapter, history and evaluations
        shared = read_json(donor / STAGE1_FILE)
        copy_dir(donor / "adapter_stage1", rd / "adapter_stage1")
        write_json_atomic(rd / STAGE1_FILE, {**shared, "copied_from": str(donor.relative_to(out_dir))},
                          indent=None)
        model, tok = load_adapter(cfg, rd / "adapter_stage1", device, trainable=True), load_tokenizer(cfg)
        position, history, evals = (2, 1, 0), shared["history"], shared["evals"]
        val_evals = shared.get("val_evals", [])
    else:
        model, tok = build_model(cfg, device, r=m.train_rank(cfg))
    loaders = [make_loaders(cfg, tok, domain, seed) for domain in cfg.domains]
    train_sets = [ld.train.dataset for ld in loaders]

    def evaluate_all(model) -> None:  # one row of R (every domain, per-sequence sums) and of R_val
        evals.append([evaluate_loss_and_token_acc(model, ld.eval, amp_dtype, per_sequence=True)
                      for ld in loaders])
        if cfg.n_val:
            val_evals.append([evaluate_loss_and_token_acc(model, ld.val, amp_dtype) for ld in loaders])

    def matrix(rows, x) -> list[list[float]]:
        return [[e[x] for e in row] for row in rows]

    def metrics_so_far() -> dict:  # an unfinished run's two-domain keys
        return two_domain_evals(cfg.domains, matrix(evals, "loss"), matrix(evals, "acc"))

    def checkpoint(model, pos, st, rows) -> None:
        done = [h for h in history if h["stage"] < pos[0]] + rows
        write_json_atomic(rd / "history.json", done)  # live history, for plotting mid-run
        save_checkpoint(rd, model, pos, st, {"history": done, "evals": evals, "val_evals": val_evals})

    def result(complete: bool) -> dict:
        return {"config": config, "history": history, "metrics": metrics_so_far(), "complete": complete}

    if stop_after_stage is not None and position[0] > stop_after_stage:
        return result(False)
    if not evals:  # LoRA B starts at zero, so the fresh PEFT model computes the base model
        evaluate_all(model)
    for stage in range(position[0], n_stages + 1):
        resume = None
        if state is not None and stage == position[0] and position[1:] != (1, 0):
            resume = {"epoch": position[1], "step": position[2], "state": state,
                      "rows": [h for h in history if h["stage"] == stage]}
        if stage > 1:
            if resume is None:  # a fresh start of the stage: its own seed, then any new adapter
                set_seed(stage_seed(seed, stage))
                if m.adapter != "continue":
                    model = stage_model(cfg, m, rd, stage, device, stage_seed(seed, stage, 1))
            elif m.adapter == "add":  # the checkpoint holds only the new adapter
                model = _with_factors(stage_model(cfg, m, rd, stage, device, stage_seed(seed, stage, 1)), model)
        reference = stage_reference(cfg, m, rd, stage, train_sets, device)
        data, length = stage_train_set(cfg, train_sets, stage, m.data)
        model, rows = train_stage(model, cfg, m, stage, train_loader(cfg, data, seed, length),
                                  loaders[stage - 1].eval, m.stage_ranks(cfg, stage),
                                  reference=reference, amp_dtype=amp_dtype, progress=progress,
                                  resume=resume, checkpoint=checkpoint)
        history[:] = [h for h in history if h["stage"] < stage] + rows
        del evals[stage:], val_evals[stage:]
        evaluate_all(model)
        save_adapter(model, adapter_dir(rd, stage, n_stages))
        if stage == 1:
            write_json_atomic(rd / STAGE1_FILE, {"key": key, "history": history, "evals": evals,
                                                 "val_evals": val_evals}, indent=None)
        if stage < n_stages:
            checkpoint(model, (stage + 1, 1, 0), {}, [])
            if stop_after_stage == stage:
                return result(False)
    val = {x: matrix(val_evals, x) for x in ("loss", "acc")} if cfg.n_val else None
    metrics = run_metrics(cfg.domains, matrix(evals, "loss"), matrix(evals, "acc"), val)
    if cfg.sweep_ranks and cfg.sweep_kinds and n_stages == 2 and m.adapter == "continue":
        kinds = [(k, m.cut_scaling(cfg) if k == "slice" else "preserve") for k in cfg.sweep_kinds]
        del model  # the sweep loads both adapters back from disk
        sweep = sweep_run(rd, cfg, {"A": loaders[0].eval, "B": loaders[1].eval}, cfg.sweep_ranks, kinds,
                          device, amp_dtype, progress)
        base = {"A": metrics["A_base"], "B": metrics["B_base"]}
        full = {"A": metrics["A_after_stage1"], "B": metrics["B_after_stage2"]}
        metrics.update(sweep_aucs(sweep, base, full, r_max=max(cfg.r, *cfg.sweep_ranks)))
    # no timings in metrics.json: same seed, same file
    write_json_atomic(rd / "history.json", history)
    write_json_atomic(rd / SEQUENCES_FILE, {"domains": list(cfg.domains),
                                            "R": [[e["seq"] for e in row] for row in evals]}, indent=None)
    write_json_atomic(rd / "metrics.json", metrics)  # written last: marks the run complete
    if not cfg.keep_checkpoints:
        clear_checkpoints(rd)
    return result(True) | {"metrics": metrics}


def _with_factors(model, source):
    """`model` with its LoRA factors copied from `source` (same rank); returns `model`."""
    with torch.no_grad():
        for (_, a, b, _), (_, a0, b0, _) in zip(lora_factors(model), lora_factors(source)):
            a.copy_(a0), b.copy_(b0)
    return model


def run_all(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
            lambdas: dict[str, tuple[float, ...]] | None = None, suffix: str = "") -> list[dict]:
    """Every method in `cfg.methods` x seed in `cfg.seeds` (complete runs skipped, interrupted
    ones resumed), then the lambda sweeps `lambdas` ({method: (lambda, ...)}, see
    `run_lambda_sweep`); rebuilds summary.csv; returns its rows for these runs. A `suffix`
    names the run folders `<method><suffix>` (e.g. "_delta_w" for another dc_variant)."""
    names = []
    for method in cfg.methods:
        for seed in cfg.seeds:
            done = (run_dir(out_dir, method + suffix, seed) / "metrics.json").exists()
            if done and progress:
                tqdm.write(f"{method + suffix} seed {seed}: complete in {out_dir}, skipped")
            run_experiment(cfg, method, seed, out_dir, progress=progress, name=method + suffix)
        names.append(method + suffix)
    for method, values in (lambdas or {}).items():
        names += run_lambda_sweep(cfg, out_dir, method, values, progress, suffix)
    write_summary(out_dir)
    return [summary_row(run_dir(out_dir, name, s)) for name in names for s in cfg.seeds]


def run_lambda_sweep(cfg: ExperimentConfig, out_dir: str | Path, method: str, values,
                     progress: bool = True, suffix: str = "") -> list[str]:
    """`method` at each lambda of its regularizer (lambda_dc, lambda_l2, lambda_ewc or
    lambda_olora) x every seed, in `<out>/<method><suffix>_lam<value>/`; a value equal to cfg's
    own is the plain `<out>/<method><suffix>/` run. Returns the run names. Stage 1 is shared."""
    reg = get_method(method).regularizer()
    if reg is None:
        raise ValueError(f"method {method!r} has no lambda-weighted regularizer to sweep; "
                         f"sweepable: {[m for m in METHOD_NAMES if get_method(m).regularizer()]}")
    field, names = LAMBDA_FIELDS[reg], []
    for lam in values:
        name = method + suffix if lam == getattr(cfg, field) else sweep_name(method + suffix, lam)
        for seed in cfg.seeds:
            run_experiment(dataclasses.replace(cfg, **{field: float(lam)}), method, seed, out_dir,
                           progress=progress, name=name)
        names.append(name)
    return names
