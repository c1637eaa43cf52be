"""Grids of runs: methods x seeds and lambda sweeps, run in one call or split into shards
(`--shard I/N`, or a SLURM job array) that other processes or machines run on one results
folder; one lock file per run folder keeps two processes out of one run.

    runs = grid(cfg, lambdas)              # every (name, method, seed, config) of the call
    mine = take_shard(runs, 0, 4)          # shard 0 of 4: a contiguous block, seed-major
    run_all(cfg, out, shard=(0, 4))        # run it; summary.csv holds every finished run
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .config import ExperimentConfig
from .methods import LAMBDA_FIELDS, check_lambdas, get_method
from .results import run_dir, summary_row, write_summary

_SHARD = re.compile(r"(\d+)/(\d+)")


def lambda_grid(lo: float, hi: float, per_decade: int = 3) -> tuple[float, ...]:
    """Log-spaced lambdas from lo to hi, `per_decade` per factor of 10, at 3 significant digits
    (so run names stay short): lambda_grid(0.1, 10) = (0.1, 0.215, 0.464, 1, 2.15, 4.64, 10).
    A `lo` that is a rounded grid point (2.15 for 10^(1/3)) counts as that point, so
    lambda_grid(2.15, 21.5) = (2.15, 4.64, 10, 21.5), not (2.15, 4.63, 9.98, 21.5)."""
    if not 0 < lo <= hi:
        raise ValueError(f"lambda grid {lo}:{hi}: need 0 < lo <= hi")
    step = round(math.log10(lo) * per_decade)
    if float(f"{10 ** (step / per_decade):.3g}") == float(f"{lo:.3g}"):
        lo = 10 ** (step / per_decade)
    n = round(math.log10(hi / lo) * per_decade)
    return tuple(float(f"{lo * 10 ** (k / per_decade):.3g}") for k in range(n + 1))


def sweep_name(method: str, lam: float) -> str:
    """The run folder name of `method` at lambda `lam` in a lambda sweep, e.g. "dc_lam0.1"."""
    return f"{method}_lam{lam:g}"


def at_rank(cfg: ExperimentConfig, k: int) -> ExperimentConfig:
    """`cfg` for an adapter of rank k: r = k, the rank schedule and Matryoshka ranks capped at
    k, and only the own-rank row swept (read from R: no extra evaluation)."""
    return dataclasses.replace(cfg, r=k, rank_schedule=tuple(min(x, k) for x in cfg.rank_schedule),
                               matryoshka_ranks=tuple(x for x in cfg.matryoshka_ranks if x <= k),
                               sweep_ranks=(k,) if cfg.sweep_ranks else ())


def grid(cfg: ExperimentConfig, lambdas: dict | None = None, suffix: str = "",
         ranks: dict | None = None) -> list[tuple]:
    """Every run of a `run_all` call as (name, method, seed, config), seed-major: all runs of a
    seed are neighbours, so a shard mostly holds whole seeds and shares their Stage 1. The
    lambda sweeps (`{method: (lambda, ...)}`) give runs `<method><suffix>_lam<value>`; a value
    equal to cfg's own is the plain `<method><suffix>` run, listed once. `ranks` ({method:
    (k, ...)}) adds the method trained at each LoRA rank k (`at_rank`): runs
    `<method><suffix>_r<k>` (k = cfg.r is the plain run), e.g. the per-rank references of the
    rank-flexibility benchmark."""
    check_lambdas(lambdas or {})
    check_suffix(suffix)
    for method, ks in (ranks or {}).items():
        get_method(method)
        if any(not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"--ranks {method}={ks}: ranks must be positive integers")
    per_seed = [(method + suffix, method, cfg) for method in cfg.methods]
    for method in cfg.methods:  # every method's settings checked before any run starts
        get_method(method).check_config(cfg)
    for method, values in (lambdas or {}).items():
        field = LAMBDA_FIELDS[get_method(method).regularizer()]
        for lam in values:
            name = method + suffix if lam == getattr(cfg, field) else sweep_name(method + suffix, lam)
            if all(name != n for n, *_ in per_seed):
                per_seed.append((name, method, dataclasses.replace(cfg, **{field: float(lam)})))
    for method, ks in (ranks or {}).items():
        for k in ks:
            name = method + suffix if k == cfg.r else f"{method}{suffix}_r{k}"
            if all(name != n for n, *_ in per_seed):
                per_seed.append((name, method, cfg if k == cfg.r else at_rank(cfg, k)))
    return [(name, method, seed, c) for seed in cfg.seeds for name, method, c in per_seed]


def check_suffix(suffix: str) -> None:
    """ValueError when the run-folder suffix holds a path separator (runs outside the results folder)."""
    if any(c in suffix for c in ("/", "\\", os.sep, os.altsep or "/", "\0")):
        raise ValueError(f"--suffix {suffix!r}: a suffix ends run folder names and may not hold a path "
                         "separator (it would put runs outside --out); use e.g. _delta_w")


def take_shard(runs: list, index: int, count: int) -> list:
    """Shard `index` (0-based) of `count`: a contiguous block of `runs`, the blocks as equal as
    can be. Deterministic: every process computes the same split."""
    if not (isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard {index}/{count}: need 0 <= I < N (I counts from 0)")
    lo, hi = index * len(runs) // count, (index + 1) * len(runs) // count
    return runs[lo:hi]


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N); ValueError naming the text."""
    match = _SHARD.fullmatch(text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"--shard {text}: write I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(match[1]), int(match[2])


def shard_from_env(env=os.environ) -> tuple[int, int] | None:
    """(index, count) of a SLURM job array task, or None outside one. The array must be
    contiguous (--array=0-7 or 1-8): index = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    if "SLURM_ARRAY_TASK_COUNT" not in env:  # each task would run the whole grid
        raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: give the shard "
                         "with --shard I/N")
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX")
    for name in names:
        if name in env and not env[name].strip().isdigit():
            raise ValueError(f"{name}={env[name]!r} is not a task number; give the shard with --shard I/N")
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    lo, hi = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_MAX", count - 1))
    if hi - lo + 1 != count:
        raise ValueError(f"SLURM job array {lo}-{hi} holds {count} tasks: give a contiguous "
                         "array (e.g. --array=0-7, no step or list) or --shard I/N")
    return task - lo, count


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during the run in folder `run`; says where it can resume from."""

    def __init__(self, run: Path, checkpoint_every: int):
        super().__init__(run)
        self.run, self.checkpoint_every = run, checkpoint_every

    def __str__(self) -> str:
        from .checkpoint import CHECKPOINTS, checkpoint_position

        at = checkpoint_position(self.run)
        if at is None:
            every = f"every {self.checkpoint_every} steps and " if self.checkpoint_every else ""
            where = f"it had no checkpoint yet (they are written {every}at each epoch's end), so it starts over"
        else:
            where = (f"it resumes from its latest checkpoint, stage {at[0]} epoch {at[1]} step {at[2]}, "
                     f"in {self.run / CHECKPOINTS} (later steps are trained again)")
        return (f"the run in {self.run} was interrupted. Run the same command again: finished runs "
                f"are skipped and {where}")


def preflight(cfg: ExperimentConfig, out_dir: str | Path, lambdas: dict) -> None:
    """The checks of a call to `run_all` that no single run makes before it trains: the lambda
    sweeps (they run after every method), the device, that the model's tokenizer and positions
    fit `cfg` (from its config.json) and a writable `out_dir`; warns when a batch is larger than
    the training set (one step per epoch). The data are checked by the first run as it loads
    them, before its first step."""
    from .models import check_model_config
    from .train import resolve_device

    check_lambdas(lambdas)
    resolve_device(cfg.device)
    check_model_config(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write results to {out} ({err.strerror}); choose a folder "
                              "you can write to with --out") from None
    if cfg.batch_size > cfg.n_train:
        warnings.warn(f"batch_size={cfg.batch_size} > n_train={cfg.n_train}: every epoch is one "
                      "step of one short batch", stacklevel=2)


def run_all(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
            lambdas: dict[str, tuple[float, ...]] | None = None, suffix: str = "",
            shard: tuple[int, int] | None = None, ranks: dict[str, tuple[int, ...]] | None = None) -> list[dict]:
    """Every method in `cfg.methods` x seed in `cfg.seeds`, then the lambda sweeps `lambdas`
    ({method: (lambda, ...)}, see `run_lambda_sweep`) and the methods at other ranks `ranks`
    ({method: (k, ...)}, see `grid`): complete runs skipped, interrupted ones
    resumed. `shard=(I, N)` runs only `take_shard(grid(...), I, N)`. Rebuilds summary.csv from
    every finished run in `out_dir` (those of other shards too); returns the rows of this call's
    runs. A `suffix` names the run folders `<method><suffix>` (e.g. "_delta_w")."""
    from .runs import run_experiment  # torch and transformers: only once a run starts

    check_suffix(suffix)  # before preflight makes out_dir
    preflight(cfg, out_dir, lambdas or {})
    runs = grid(cfg, lambdas, suffix, ranks)
    if shard is not None:
        runs = take_shard(runs, *shard)
        if progress:
            tqdm.write(f"shard {shard[0]}/{shard[1]}: {len(runs)} of the grid's runs")
    for name, method, seed, run_cfg in runs:
        if (run_dir(out_dir, name, seed) / "metrics.json").exists() and progress:
            tqdm.write(f"{name} seed {seed}: complete in {out_dir}, skipped")
        try:
            run_experiment(run_cfg, method, seed, out_dir, progress=progress, name=name)
        except KeyboardInterrupt:
            raise RunInterrupted(run_dir(out_dir, name, seed), run_cfg.checkpoint_every) from None
    write_summary(out_dir)
    return [summary_row(run_dir(out_dir, name, seed)) for name, _, seed, _ in runs]


def run_lambda_sweep(cfg: ExperimentConfig, out_dir: str | Path, method: str, values,
                     progress: bool = True, suffix: str = "") -> list[str]:
    """`method` at each lambda of its regularizer (lambda_dc, lambda_l2, lambda_ewc or
    lambda_olora) x every seed, in `<out>/<method><suffix>_lam<value>/`; a value equal to cfg's
    own is the plain `<out>/<method><suffix>/` run. Returns the run names. Stage 1 is shared."""
    from .runs import run_experiment

    runs = grid(dataclasses.replace(cfg, methods=()), {method: values}, suffix)
    names = list(dict.fromkeys(name for name, *_ in runs))
    for name in names:  # lambda-major: the first value's runs train the Stage 1 the others copy
        for run_name, m, seed, run_cfg in runs:
            if run_name == name:
                run_experiment(run_cfg, m, seed, out_dir, progress=progress, name=name)
    return names
