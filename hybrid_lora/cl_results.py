"""Continual-learning tables from result files: plasticity, paired bootstrap intervals over
evaluation sequences, lambda-sweep run names. No torch here.

    table = cl_table(out)          # one row per run name: mean, s.d. and CIs vs sequential LoRA
    plot_pareto(table)             # hybrid_lora.plots: forgetting vs gain, one point per row
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .results import SEQUENCES_FILE, load_summary, read_json, run_dir

BASELINE = "lora"    # sequential LoRA: every interval is a difference against it
REFERENCE = "single"  # each domain trained alone: the denominator of plasticity
TABLE_KEYS = ("avg_final_acc", "bwt", "forgetting_first", "delta_loss_first", "delta_ppl_first",
              "gain_retained_first", "new_gain", "new_acc", "plasticity_new")


def sweep_name(method: str, lam: float) -> str:
    """The run folder name of `method` at lambda `lam` in a lambda sweep, e.g. "dc_lam0.1"."""
    return f"{method}_lam{lam:g}"


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resampling counts: row b says how often each of n sequences is drawn in
    bootstrap sample b (n draws with replacement)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx])


def paired_bootstrap_stat(stat, n: int, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """(stat on all sequences, lower, upper): percentile bootstrap interval of `stat`, a function
    of sequence weights w [..., n] (all ones = the observed data) returning [...]. Paired: every
    quantity inside `stat` is computed on the same resampled sequences."""
    w = bootstrap_counts(n, n_boot, seed).astype(float)
    boots = stat(w)
    tail = (1 - level) / 2
    return float(stat(np.ones((1, n)))[0]), float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


def _token_loss(entry: dict, w: np.ndarray) -> np.ndarray:
    """Token-weighted mean loss of one R entry's sequences under weights w [B, n] -> [B]."""
    return (w @ np.asarray(entry["nll"])) / (w @ np.asarray(entry["tokens"], dtype=float))


def forgetting_stats(seq: dict, domain: int = 0):
    """Functions of sequence weights for one run's `eval_sequences.json`: forgetting on
    `domain` (loss after the last stage minus after its own stage, nats/token) and the loss on
    the last stage's domain after the last stage."""
    R = seq["R"]
    T = len(R) - 1
    return {"delta_loss": lambda w: _token_loss(R[T][domain], w) - _token_loss(R[domain + 1][domain], w),
            "new_loss": lambda w: _token_loss(R[T][T - 1], w)}


def bootstrap_vs_baseline(out: str | Path, run: str, seeds, quantity: str, baseline: str = BASELINE,
                          n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """(difference, lower, upper) of `quantity` ("delta_loss" or "new_loss") between `run` and
    `baseline`, averaged over `seeds`, with a paired bootstrap over the evaluation sequences
    (the same sequences for every seed and run: the eval set depends on data_seed only)."""
    pairs = [(read_json(run_dir(out, run, s) / SEQUENCES_FILE), read_json(run_dir(out, baseline, s) / SEQUENCES_FILE))
             for s in seeds]
    n = len(pairs[0][0]["R"][0][0]["nll"])
    fns = [(forgetting_stats(a)[quantity], forgetting_stats(b)[quantity]) for a, b in pairs]
    return paired_bootstrap_stat(lambda w: sum(f(w) - g(w) for f, g in fns) / len(fns), n, n_boot, level, seed)


def cl_table(out: str | Path, baseline: str = BASELINE, n_boot: int = 2000, level: float = 0.95):
    """One row per run name under `out` (methods, and each lambda of a sweep): method, lambda,
    variant (the DC variant, "" without DC), n_seeds, mean and s.d. over seeds of TABLE_KEYS, and for every run but the baseline the
    difference from `baseline` (seeds both have, with eval_sequences.json) in forgetting on the first domain
    (`d_forget`, nats/token) and in final loss on the new domain (`d_new_loss`), with the
    paired bootstrap interval (`*_lo`, `*_hi`). `forgets_less` is True when the whole interval
    of d_forget is below zero; the interval covers the evaluation sequences, not training noise,
    so `seeds_forget_less` counts the seeds in which the run forgot less than the baseline. plasticity_new = the run's loss gain on the new domain over the
    base (nats), divided by that of the "single" run (domain trained alone) of the same seed; in
    loss, because token accuracy can barely move on a far domain in a short run, which makes a
    ratio of accuracy gains meaningless."""
    import pandas as pd

    summary = load_summary(out)
    if summary.empty:
        raise FileNotFoundError(f"no finished runs under {out}")
    ref = summary[summary["run"] == REFERENCE].set_index("seed")
    rows = []
    for run, group in summary.groupby("run", sort=False):
        group = group.copy()
        group["plasticity_new"] = [_plasticity(out, run, s, ref) for s in group["seed"]]
        row = {"run": run, "method": group["method"].iloc[0], "lambda": group["lambda"].iloc[0],
               "variant": group["variant"].iloc[0], "n_seeds": group["seed"].nunique()}
        for k in TABLE_KEYS:
            row[k], row[f"{k}_sd"] = group[k].mean(), group[k].std()
        seeds = [s for s in sorted(set(group["seed"]) & set(summary.loc[summary["run"] == baseline, "seed"]))
                 if all((run_dir(out, r, s) / SEQUENCES_FILE).exists() for r in (run, baseline))]
        for q, col in (("delta_loss", "d_forget"), ("new_loss", "d_new_loss")):
            d = (bootstrap_vs_baseline(out, run, seeds, q, baseline, n_boot, level)
                 if seeds and run != baseline else (math.nan,) * 3)
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = d
        row["forgets_less"] = bool(row["d_forget_hi"] < 0)
        base = summary[summary["run"] == baseline].set_index("seed")["delta_loss_first"]
        mine = group.set_index("seed")["delta_loss_first"]
        row["seeds_forget_less"] = int(sum(mine[s] < base[s] for s in seeds)) if run != baseline else 0
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def _plasticity(out, run: str, seed: int, ref) -> float:
    """(loss[0][T-1] - loss[T][T-1]) / (same for the single-domain run of `seed`), or NaN."""
    if seed not in ref.index:
        return math.nan
    loss = read_json(run_dir(out, run, seed) / "metrics.json")["R"]["loss"]
    loss_ref = read_json(run_dir(out, REFERENCE, seed) / "metrics.json")["R"]["loss"]
    T = len(loss) - 1
    denom = loss_ref[0][T - 1] - loss_ref[T][T - 1]
    return (loss[0][T - 1] - loss[T][T - 1]) / denom if denom else math.nan


def r_matrix(run: str | Path):
    """One run folder's R matrix as a DataFrame: rows "base", "after stage 1", ...; columns
    (loss | acc, domain)."""
    import pandas as pd

    R = read_json(Path(run) / "metrics.json")["R"]
    index = ["base"] + [f"after stage {t} ({d})" for t, d in enumerate(R["domains"], 1)]
    frames = {x: pd.DataFrame(R[x], index=index, columns=R["domains"]) for x in ("loss", "acc")}
    return pd.concat(frames, axis=1)
