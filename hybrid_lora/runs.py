"""Runs: one method x seed over a sequence of stages, resumable (grids of runs: `grid.py`).

    run_experiment: build -> evaluate the base on every domain (R row 0)
                    -> for each stage t: set up the method's references to the adapters of
                       earlier stages (`continual.py`) -> train on domain t (`train.train_stage`)
                       -> evaluate every domain (R row t) -> save the adapter
                    -> write config/history/metrics/eval_sequences.

Runs checkpoint as they go (`checkpoint.py`); calling `run_experiment` again on the same
folder resumes from the latest checkpoint, or returns at once if the run is complete.
`config.json` also records fingerprints of the data and the base model, so a run is never
resumed or skipped on data or a model other than its own.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch

from .adapters import base_fingerprint, build_model, load_adapter, load_tokenizer, lora_factors, rng_isolated
from .allocation import save_allocated
from .checkpoint import (CHECKPOINTS, checkpoint_position, clear_checkpoints, copy_dir, load_checkpoint,
                         run_lock, save_adapter, save_checkpoint, write_dir_atomic)
from .config import RUN_INDEPENDENT_FIELDS, STAGE2_FIELDS, SWEEP_FIELDS, ExperimentConfig
from .continual import adapter_dir, stage_model, stage_reference
from .data import fingerprint, make_loaders, stage_train_set, train_loader
from .evaluate import choose_amp_dtype, evaluate_loss_and_token_acc
from .distributed import barrier, is_main, process_seed, setup, world
from .families import canonical_targets
from .methods import Method, get_method
from .ranks import sweep_run
from .results import (SCHEMA_VERSION, SEQUENCES_FILE, STAGE1_FILE, read_json, run_dir, run_metrics,
                      two_domain_evals, write_history, write_json_atomic)
from .sources import hub_id
from .analysis.sweep_results import sweep_aucs, sweep_reference
from .tracking import open_tracking, step_offsets
from .train import NonFiniteLoss, resolve_device, set_seed, train_stage, warn_emulated_bf16


_DEFAULTS = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
             for f in dataclasses.fields(ExperimentConfig)}


def _same_setting(field: str, saved, now) -> bool:
    """Equal values; for `data_dir`, and `model_name` folders, two spellings of one folder
    (relative or absolute, a trailing slash) are the same setting, and so are an old hub id and
    its canonical one ("gpt2", "openai-community/gpt2")."""
    if saved == now:
        return True
    if field == "model_name" and isinstance(saved, str) and isinstance(now, str) \
            and hub_id(saved, quiet=True) == hub_id(now, quiet=True):
        return True
    if field in ("data_dir", "model_name") and isinstance(saved, str) and isinstance(now, str):
        if field == "data_dir" or (os.path.exists(saved) and os.path.exists(now)):
            return os.path.realpath(os.path.expanduser(saved)) == os.path.realpath(os.path.expanduser(now))
    return False


def check_same_run(run: Path, saved: dict, config: dict, ignore: tuple[str, ...] = ()) -> None:
    """Raise ValueError if `saved` (`run`'s config.json) differs from `config` in a field that
    changes results (other than those in `ignore`)."""
    saved = dict(saved)
    for k, v in _DEFAULTS.items():  # a field added after the run was made acts as its default did
        saved.setdefault(k, v)
    if "target_modules" in config:  # ("attention",) is the family's list spelled out
        saved["target_modules"] = list(canonical_targets(saved.get("model_name", ""), saved["target_modules"]))
        config = {**config, "target_modules": list(canonical_targets(config.get("model_name", ""),
                                                                     config["target_modules"]))}
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in config.items()
             if k not in RUN_INDEPENDENT_FIELDS + ignore and not _same_setting(k, saved.get(k), v)]
    if diffs:
        again = ("; to sweep a finished run at other ranks or kinds, use `python -m hybrid_lora "
                 f"sweep-ranks --run {run}`" if all(d.split(":")[0] in SWEEP_FIELDS for d in diffs) else "")
        raise ValueError(f"{run} holds a run made with other settings ({'; '.join(diffs)}). "
                         f"Use another output folder, or delete {run} to start it over{again}.")


def read_saved_config(run: Path) -> dict:
    """`run/config.json`; ValueError naming the file when it cannot be read."""
    try:
        return read_json(run / "config.json")
    except ValueError as err:
        raise ValueError(f"{run / 'config.json'} is unreadable ({err}); delete {run} to start "
                         "the run over") from None


def check_fingerprints(run: Path, saved: dict, now: dict) -> None:
    """ValueError when the data of a domain or the base model differ from those `run` was
    made with (`fingerprints` in its config.json; runs from before fingerprints pass)."""
    old = saved.get("fingerprints") or {}
    changed = [f"the data of domain {d!r}" for d, fp in now.get("data", {}).items()
               if old.get("data", {}).get(d, fp) != fp]
    if "model" in now and old.get("model", now["model"]) != now["model"]:
        changed.append(f"the base model {saved.get('model_name')!r}")
    if changed:
        raise ValueError(f"{run} was made on other data or another model: {' and '.join(changed)} "
                         "changed since (fingerprints in its config.json). Put back what it was made "
                         f"with (the run then goes on), use another output folder, or delete {run} to "
                         "start it over.")


def _started(run: Path) -> bool:
    """Whether `run` holds anything trained (a checkpoint, a Stage-1 adapter, metrics)."""
    return any((run / f).exists() for f in (CHECKPOINTS, "adapter_stage1", STAGE1_FILE, "metrics.json"))


def stage_seed(seed: int, stage: int, stream: int = 0) -> int:
    """The seed a stage >= 2 starts from (stream 0): later stages do not depend on how many
    random numbers earlier stages drew, so runs with the same Stage 1 can share it. Stream 1
    seeds the random init of a new adapter (`continual.stage_model`) apart from training."""
    key = [seed, stage] + ([stream] if stream else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def stage1_key(cfg: ExperimentConfig, method: Method, seed: int, data: dict) -> dict:
    """Everything Stage 1 (and the evaluations after it) depends on; `data`: the fingerprint
    of each domain's data."""
    skip = set(STAGE2_FIELDS + RUN_INDEPENDENT_FIELDS)
    key = {"config": {k: v for k, v in cfg.to_dict().items() if k not in skip},
           "method": list(method.stage1_signature()), "seed": seed, "schema_version": SCHEMA_VERSION,
           "data": data}
    if method.reads_target_rank():  # its Stage 1 reads one of the Stage-2 fields
        key["target_rank"] = cfg.rank_schedule[-1]
    return key


def _shared_stage1(out_dir: Path, rd: Path, key: dict) -> Path | None:
    """Another run folder under `out_dir` whose finished Stage 1 has this key, or None."""
    for path in sorted(Path(out_dir).glob(f"*/seed{key['seed']}/{STAGE1_FILE}")):
        # a stage1.json without its adapter (adapters are not committed) cannot be shared
        if path.parent != rd and (path.parent / "adapter_stage1").is_dir() and _same_key(read_json(path)["key"], key):
            return path.parent
    return None


def _same_key(saved: dict, key: dict) -> bool:
    """Whether a saved Stage-1 key is `key`; a config field added after it was saved counts as
    its default (as `check_same_run` has it), so older Stage 1s are still shared."""
    config = {k: v for k, v in key["config"].items() if k in saved.get("config", {}) or v != _DEFAULTS.get(k)}
    return {**saved, "config": saved.get("config")} == {**key, "config": config}


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
    ValueError when the folder holds a run made with other settings, data or base model
    (`check_same_run`, `check_fingerprints`); `NonFiniteLoss` on a loss or evaluation that is
    not finite (the run is then not marked complete).
    """
    get_method(method).check_config(cfg)  # before the run's folder is made
    rd = run_dir(out_dir, name or method, seed)
    if (rd / "metrics.json").exists():  # complete: only read
        return _run_experiment(cfg, method, seed, out_dir, progress, stop_after_stage, rd)
    with run_lock(rd):  # RunLocked when another process (a shard, a second call) runs it
        return _run_experiment(cfg, method, seed, out_dir, progress, stop_after_stage, rd)


def _run_experiment(cfg, method, seed, out_dir, progress, stop_after_stage, rd) -> dict:
    """The run of `run_experiment` in its folder `rd`: check the folder against this call, load
    the data, start (or resume, or take a shared Stage 1), train the stages, then write the
    metrics, sweep the adapters and mark the run complete."""
    m = get_method(method)
    config = {**cfg.to_dict(), "method": method, "seed": seed, "schema_version": SCHEMA_VERSION}
    complete = (rd / "metrics.json").exists()
    saved = _saved_config(rd, config, complete)
    if complete and not (saved or {}).get("fingerprints"):  # made before fingerprints existed
        return _finished(rd, saved or config)
    tok = load_tokenizer(cfg)
    loaders = [make_loaders(cfg, tok, domain, seed) for domain in cfg.domains]
    prints = {"data": {d: fingerprint(ld) for d, ld in zip(cfg.domains, loaders)}}
    if saved is not None:  # cheap enough to check a complete run too: no model is loaded
        check_fingerprints(rd, saved, prints)
    if complete:
        return _finished(rd, saved or config)
    set_seed(seed)  # the same on every process: the LoRA init must agree
    device = setup(resolve_device(cfg.device))  # joins the process group under accelerate / torchrun
    amp = choose_amp_dtype(cfg.mixed_precision, device)  # once
    warn_emulated_bf16(amp, device)
    run = _Run(rd, cfg, m, loaders, amp, config)
    key = stage1_key(cfg, m, seed, prints["data"])
    model, position, state = _start(run, saved, out_dir, key, device)
    prints["model"] = base_fingerprint(model)  # LoRA weights left out: the same at every resume
    if saved is not None:
        check_fingerprints(rd, saved, prints)
    config["fingerprints"] = prints
    write_json_atomic(rd / "config.json", config)  # only once data and model have loaded
    if stop_after_stage is not None and position[0] > stop_after_stage:
        return run.result(False)
    run.tracking = open_tracking(cfg, rd, f"{rd.parent.name}/{rd.name}", config)  # report_to
    try:
        if not run.evals:  # LoRA B starts at zero, so the fresh PEFT model computes the base model
            run.evaluate_all(model)
        model = _train_stages(run, model, position, state, seed, key, device, progress, stop_after_stage)
    finally:
        if run.tracking is not None:
            run.tracking.finish()
    if model is None:  # stopped after stage `stop_after_stage`
        return run.result(False)
    val = {x: _matrix(run.val_evals, x) for x in ("loss", "acc")} if cfg.n_val else None
    metrics = run_metrics(cfg.domains, _matrix(run.evals, "loss"), _matrix(run.evals, "acc"), val)
    sequences = {"domains": list(cfg.domains), "R": [[e["seq"] for e in row] for row in run.evals]}
    if run.val_evals and all("seq" in e for row in run.val_evals for e in row):  # (not a copied old Stage 1)
        sequences["R_val"] = [[e["seq"] for e in row] for row in run.val_evals]
    write_json_atomic(rd / SEQUENCES_FILE, sequences, indent=None)  # the sweep reads it
    barrier()
    # (an allocated adapter has per-module ranks and unordered components: no uniform cut)
    if cfg.sweep_ranks and cfg.sweep_kinds and len(cfg.domains) <= 2 and m.adapter == "continue" \
            and not m.allocation:
        del model  # the sweep loads both adapters back from disk
        metrics.update(_final_sweep(run, "R_val" in sequences, device, progress))
    # no timings in metrics.json: same seed, same file
    write_history(rd, run.history)
    write_json_atomic(rd / "metrics.json", metrics)  # written last: marks the run complete
    if not cfg.keep_checkpoints:
        clear_checkpoints(rd)
    barrier()  # every process returns once the files are there
    return run.result(True) | {"metrics": metrics}


def _saved_config(rd: Path, config: dict, complete: bool) -> dict | None:
    """The run folder's saved config.json, checked against this call's `config` (ValueError
    naming the fields that differ), or None for a new run. A config.json with nothing trained
    beside it (a run that failed while loading) binds nothing."""
    saved = read_saved_config(rd) if (rd / "config.json").exists() and _started(rd) else None
    if saved is not None:
        at_boundary = not complete and checkpoint_position(rd) == (2, 1, 0)
        check_same_run(rd, saved, config, ignore=() if complete else STAGE2_FIELDS if at_boundary else SWEEP_FIELDS)
    return saved


def _finished(rd: Path, config: dict) -> dict:
    """A complete run as `run_experiment` returns it, read from its files."""
    return {"config": config, "history": read_json(rd / "history.json"),
            "metrics": read_json(rd / "metrics.json"), "complete": True}


def _matrix(rows, x: str) -> list[list[float]]:
    """The loss or accuracy (`x`) matrix of R rows of evaluations."""
    return [[e[x] for e in row] for row in rows]


class _Run:
    """One run while it trains: its folder, config, method, data and amp dtype, and what it
    has so far (history rows, R and R_val rows of evaluations)."""

    def __init__(self, rd: Path, cfg, m: Method, loaders, amp_dtype, config: dict):
        self.rd, self.cfg, self.m, self.loaders, self.amp_dtype, self.config = rd, cfg, m, loaders, amp_dtype, config
        self.history, self.evals, self.val_evals = [], [], []
        self.tracking = None  # tracking.Tracking on the main process when cfg.report_to

    def evaluate_all(self, model) -> None:
        """One row of R (every domain, per-sequence sums) and of R_val; NonFiniteLoss on a NaN."""
        cfg, amp = self.cfg, self.amp_dtype
        self.evals.append([evaluate_loss_and_token_acc(model, ld.eval, amp, per_sequence=True)
                           for ld in self.loaders])
        for domain, e in zip(cfg.domains, self.evals[-1]):  # a NaN result never marks a run complete
            if not (math.isfinite(e["loss"]) and math.isfinite(e["acc"])):
                raise NonFiniteLoss(f"{self.rd}: evaluation on {domain!r} after stage {len(self.evals) - 1} "
                                    f"gave loss {e['loss']}, accuracy {e['acc']}; the run is not "
                                    "marked complete")
        if cfg.n_val:
            self.val_evals.append([evaluate_loss_and_token_acc(model, ld.val, amp, per_sequence=True)
                                   for ld in self.loaders])

    def checkpoint(self, model, pos, st, rows) -> None:
        """`train_stage`'s checkpoint callback: the live history.json, then the checkpoint."""
        done = [h for h in self.history if h["stage"] < pos[0]] + rows
        write_history(self.rd, done)  # live history, for plotting mid-run
        save_checkpoint(self.rd, model, pos, st, {"history": done, "evals": self.evals, "val_evals": self.val_evals})

    def result(self, complete: bool) -> dict:
        """What `run_experiment` returns: an unfinished run has its two-domain keys so far."""
        metrics = two_domain_evals(self.cfg.domains, _matrix(self.evals, "loss"), _matrix(self.evals, "acc"))
        return {"config": self.config, "history": self.history, "metrics": metrics, "complete": complete}


def _start(run: _Run, saved: dict | None, out_dir, key: dict, device):
    """(model, position, checkpoint state or None) the run goes on from: its latest checkpoint
    (when none loads, the base model is checked against the one it was made with first), an identical finished
    Stage 1 in `out_dir` (`share_stage1`: copied), or a fresh adapter. Sets the run's history
    and evaluations so far."""
    rd, cfg, m = run.rd, run.cfg, run.m
    try:
        found = load_checkpoint(rd, cfg, device)
    except ValueError:  # no checkpoint loads: a changed base model is named, not the checkpoints blamed
        if saved is not None:
            with rng_isolated():  # the model as a fresh run builds it (AdaLoRA's ranknum counts)
                fresh, _ = build_model(cfg, "cpu", r=m.train_rank(cfg), adalora=m.allocation == "adalora")
            check_fingerprints(rd, saved, {"model": base_fingerprint(fresh)})
        raise
    donor = _shared_stage1(out_dir, rd, key) if found is None and cfg.share_stage1 else None
    if found is not None:
        model, state, saved_progress = found
        run.history, run.evals = saved_progress["history"], saved_progress["evals"]
        run.val_evals = saved_progress.get("val_evals", [])
        return model, tuple(saved_progress["position"]), state
    if donor is not None:  # Stage 1 done elsewhere: take its adapter, history and evaluations
        shared = read_json(donor / STAGE1_FILE)
        copy_dir(donor / "adapter_stage1", rd / "adapter_stage1")
        if (donor / "allocated_stage1").is_dir():  # an allocating method's cut adapter
            copy_dir(donor / "allocated_stage1", rd / "allocated_stage1")
        write_json_atomic(rd / STAGE1_FILE, {**shared, "copied_from": str(donor.relative_to(out_dir))},
                          indent=None)
        barrier()  # process 0 copied it
        model = load_adapter(cfg, rd / "adapter_stage1", device, trainable=True)
        run.history, run.evals, run.val_evals = shared["history"], shared["evals"], shared.get("val_evals", [])
        return model, (2, 1, 0), None
    model, _ = build_model(cfg, device, r=m.train_rank(cfg), adalora=m.allocation == "adalora")
    return model, (1, 1, 0), None


def _train_stages(run: _Run, model, position, state, seed: int, key: dict, device, progress,
                  stop_after_stage):
    """Train stages position[0], ... (the first from `state` when it resumes mid-stage), each
    evaluated (a row of R) and saved; returns the final model, or None when it stopped after
    stage `stop_after_stage`."""
    rd, cfg, m, loaders = run.rd, run.cfg, run.m, run.loaders
    n_stages, train_sets = len(cfg.domains), [ld.train.dataset for ld in loaders]
    offsets = step_offsets([_stage_steps(cfg, m, train_sets, t) for t in range(1, n_stages + 1)])
    if run.tracking is not None and position == (1, 1, 0):
        run.tracking.log_stage(run.evals[0], 0)  # the base model
    for stage in range(position[0], n_stages + 1):
        resume = None
        if state is not None and stage == position[0] and position[1:] != (1, 0):
            resume = {"epoch": position[1], "step": position[2], "state": state,
                      "rows": [h for h in run.history if h["stage"] == stage]}
        if stage > 1:
            if resume is None:  # a fresh start of the stage: its own seed, then any new adapter
                set_seed(stage_seed(seed, stage))
                if m.adapter != "continue":
                    model = stage_model(cfg, m, rd, stage, device, stage_seed(seed, stage, 1))
            elif m.adapter == "add":  # the checkpoint holds only the new adapter
                model = _with_factors(stage_model(cfg, m, rd, stage, device, stage_seed(seed, stage, 1)), model)
        if resume is None and world()[0] > 0:  # each further process its own dropout stream
            set_seed(process_seed(seed if stage == 1 else stage_seed(seed, stage)))
        reference = stage_reference(cfg, m, rd, stage, train_sets, device)
        data, length = stage_train_set(cfg, train_sets, stage, m.data)
        model, rows = train_stage(model, cfg, m, stage, train_loader(cfg, data, seed, length),
                                  loaders[stage - 1].eval, m.stage_ranks(cfg, stage),
                                  reference=reference, amp_dtype=run.amp_dtype, progress=progress,
                                  resume=resume, checkpoint=run.checkpoint, evaluate_last=False,
                                  tracking=run.tracking, step_offset=offsets[stage - 1],
                                  val_loader=loaders[stage - 1].val)
        del run.evals[stage:], run.val_evals[stage:]
        run.evaluate_all(model)
        if run.tracking is not None:  # the R row; the last epoch's evaluation is its own domain's
            end = offsets[stage - 1] + _stage_steps(cfg, m, train_sets, stage)
            run.tracking.log_stage(run.evals[-1], end)
            run.tracking.log({"eval/loss": run.evals[-1][stage - 1]["loss"],
                              "eval/acc": run.evals[-1][stage - 1]["acc"]}, end)
        # the last epoch's evaluation is this row of R: the same model on the same loader
        if rows:
            rows[-1].update(eval_loss=run.evals[-1][stage - 1]["loss"], eval_acc=run.evals[-1][stage - 1]["acc"])
            if cfg.n_val:  # and R_val's row the last epoch's validation point
                rows[-1].update(val_loss=run.val_evals[-1][stage - 1]["loss"],
                                val_acc=run.val_evals[-1][stage - 1]["acc"])
        run.history[:] = [h for h in run.history if h["stage"] < stage] + rows
        _save_stage(model, run, stage)
        if stage == 1:
            write_json_atomic(rd / STAGE1_FILE, {"key": key, "history": run.history, "evals": run.evals,
                                                 "val_evals": run.val_evals}, indent=None)
        if stage < n_stages:
            run.checkpoint(model, (stage + 1, 1, 0), {}, [])
            if stop_after_stage == stage:
                barrier()
                return None
    return model


def _stage_steps(cfg, m: Method, train_sets: list, stage: int) -> int:
    """The optimizer steps of stage `stage` (every epoch)."""
    data, length = stage_train_set(cfg, train_sets, stage, m.data)
    return math.ceil((length or len(data)) / cfg.batch_size) * len(m.stage_ranks(cfg, stage))


def _save_stage(model, run: _Run, stage: int) -> None:
    """The stage's adapter (and, for an allocating method, the same cut to its per-module ranks,
    PEFT `rank_pattern`), on disk before the next stage's references and the sweep load it."""
    n_stages = len(run.cfg.domains)
    save_adapter(model, adapter_dir(run.rd, stage, n_stages))
    if run.m.allocation and is_main():
        write_dir_atomic(run.rd / adapter_dir(run.rd, stage, n_stages).name.replace("adapter_", "allocated_"),
                         lambda tmp: save_allocated(model, tmp))
    barrier()


def _final_sweep(run: _Run, with_val: bool, device, progress) -> dict:
    """Both saved adapters cut to each of `sweep_ranks` on both domains (and on their validation
    texts `with_val`: lambdas are chosen on them), into sweep.json; returns the SWEEP_KEYS."""
    cfg, m, loaders = run.cfg, run.m, run.loaders
    kinds = [(k, m.cut_scaling(cfg) if k == "slice" else "preserve") for k in cfg.sweep_kinds]
    swept = {d: ld.eval for d, ld in zip("AB", loaders)}  # one domain: A only
    if with_val:
        swept.update({f"{d}_val": ld.val for d, ld in zip("AB", loaders)})
    sweep = sweep_run(run.rd, cfg, swept, cfg.sweep_ranks, kinds, device, run.amp_dtype, progress)
    return sweep_aucs(sweep, *sweep_reference(sweep), r_max=max(cfg.r, *cfg.sweep_ranks))


def _with_factors(model, source):
    """`model` with its LoRA factors copied from `source` (same rank); returns `model`."""
    with torch.no_grad():
        for (_, a, b, _), (_, a0, b0, _) in zip(lora_factors(model), lora_factors(source)):
            a.copy_(a0), b.copy_(b0)
    return model


def resweep(run: str | Path, ranks=None, kinds=None, scaling: str = "method", device: str | None = None,
            n_eval: int | None = None, progress: bool = True) -> list[dict]:
    """Sweep a finished run's saved adapters again (no training) and merge the rows into its
    sweep.json (`ranks.sweep_run`): `ranks`, `kinds` default to the run's; `scaling` of slices:
    "method" (the one the method trains with), "preserve", "dylora" or "both"; `n_eval`: the
    first N evaluation texts (default the run's `sweep_n_eval`). Like the run's own sweep, it
    also sweeps the validation texts where the run evaluated them (R_val in eval_sequences.json),
    so a run made without a sweep can serve as a per-rank reference when lambdas are chosen on
    them. Returns all its rows."""
    run = Path(run)
    saved = read_json(run / "config.json")
    cfg, method = ExperimentConfig.from_dict(saved), get_method(saved["method"])
    if n_eval is not None:
        cfg = dataclasses.replace(cfg, sweep_n_eval=n_eval)
    scalings = {"method": [method.cut_scaling(cfg)], "both": ["preserve", "dylora"]}.get(scaling, [scaling])
    kinds = [(kind, s) for kind in (kinds or cfg.sweep_kinds)
             for s in (scalings if kind == "slice" else ["preserve"])]
    device = resolve_device(device or cfg.device)
    tok = load_tokenizer(cfg)
    made = {name: make_loaders(cfg, tok, domain, saved["seed"]) for name, domain in zip("AB", cfg.domains)}
    loaders = {name: ld.eval for name, ld in made.items()}
    if (run / SEQUENCES_FILE).exists() and "R_val" in read_json(run / SEQUENCES_FILE):
        loaders.update({f"{name}_val": ld.val for name, ld in made.items() if ld.val is not None})
    amp = choose_amp_dtype(cfg.mixed_precision, device)
    warn_emulated_bf16(amp, device)
    return sweep_run(run, cfg, loaders, ranks or cfg.sweep_ranks, kinds, device, amp, progress)
