"""Continual-learning tables from result files: seed-level paired t-intervals (primary),
paired bootstrap intervals over evaluation sequences, forgetting at matched gain with lambdas
chosen on validation texts (markdown: `analysis.markdown`). No torch here.

    table = cl_table(out)            # one row per run name: mean, s.d. and CIs vs sequential LoRA
    matched = matched_gain_table(out)  # each regularizer's forgetting at a fixed gain on the new domain
    per_seed = matched_per_seed(out)   # the same per seed: two methods' rows of one seed are paired
    print(markdown_table(table, CL_MARKDOWN))  # analysis.markdown
    plot_pareto(table)               # hybrid_lora.plots: forgetting vs gain, one point per row
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..results import SEQUENCES_FILE, load_summary, read_json, run_dir
from .stats import paired_bootstrap_stat, paired_t_interval

BASELINE = "lora"    # sequential LoRA: every interval is a difference against it
REFERENCE = "single"  # each domain trained alone: the denominator of plasticity
TABLE_KEYS = ("avg_final_acc", "bwt", "forgetting_first", "delta_loss_first", "delta_ppl_first",
              "gain_retained_first", "new_gain", "new_acc", "plasticity_new", "final_loss_first",
              "new_loss")


def _token_loss(entry: dict, w: np.ndarray) -> np.ndarray:
    """Token-weighted mean loss of one R entry's sequences under weights w [B, n] -> [B]."""
    return (w @ np.asarray(entry["nll"])) / (w @ np.asarray(entry["tokens"], dtype=float))


def forgetting_stats(seq: dict, domain: int = 0):
    """Functions of sequence weights for one run's `eval_sequences.json` (nats/token):
    `delta_loss`, forgetting on `domain` (loss after the last stage minus after its own stage);
    `new_loss`, the loss on the last stage's domain after the last stage; `first_gain`, the base
    loss on `domain` minus its loss after its own stage; `share_lost`, delta_loss / first_gain;
    `new_gain`, the base loss on the last stage's domain minus `new_loss`."""
    R = seq["R"]
    T = len(R) - 1
    loss = lambda t, d: (lambda w: _token_loss(R[t][d], w))  # noqa: E731
    delta, first = (lambda w: loss(T, domain)(w) - loss(domain + 1, domain)(w),
                    lambda w: loss(0, domain)(w) - loss(domain + 1, domain)(w))
    return {"delta_loss": delta, "new_loss": loss(T, T - 1), "first_gain": first,
            "share_lost": lambda w: delta(w) / first(w),
            "new_gain": lambda w: loss(0, T - 1)(w) - loss(T, T - 1)(w)}


def bootstrap_vs_baseline(out: str | Path, run: str, seeds, quantity: str, baseline: str = BASELINE,
                          n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """(difference, lower, upper) of `quantity` ("delta_loss" or "new_loss") between `run` and
    `baseline`, averaged over `seeds`, with a paired bootstrap over the evaluation sequences
    (the same sequences for every seed and run: the eval set depends on data_seed only)."""
    return bootstrap_mix(out, [(s, ((run, 1.0), (baseline, -1.0))) for s in seeds], quantity, n_boot, level, seed)


def bootstrap_mix(out: str | Path, mixes, quantity: str, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> tuple:
    """(value, lower, upper) of the mean over `mixes` [(seed, ((run, weight), ...))] of
    sum(weight x `quantity` of run) (`forgetting_stats`), with a paired bootstrap over the
    evaluation sequences; NaNs when `mixes` is empty or an `eval_sequences.json` is missing."""
    files = [[(run_dir(out, r, s) / SEQUENCES_FILE, wt) for r, wt in terms] for s, terms in mixes]
    if not mixes or not all(f.exists() for terms in files for f, _ in terms):
        return (math.nan,) * 3
    seqs = [[(read_json(f), wt) for f, wt in terms] for terms in files]
    n = len(seqs[0][0][0]["R"][0][0]["nll"])
    fns = [[(forgetting_stats(seq)[quantity], wt) for seq, wt in terms] for terms in seqs]
    return paired_bootstrap_stat(lambda w: sum(sum(wt * f(w) for f, wt in terms) for terms in fns) / len(fns),
                                 n, n_boot, level, seed)


def cl_table(out: str | Path, baseline: str = BASELINE, n_boot: int = 2000, level: float = 0.95):
    """One row per run name under `out` (methods, and each lambda of a sweep): method, lambda,
    variant (the DC variant, "" without DC), n_seeds, mean and s.d. over seeds of TABLE_KEYS,
    and for every run but the baseline its paired differences from `baseline` over the seeds
    both have:

    - seed level (primary; every source of training noise): `d_forget_seed` = mean over seeds
      of the run's `delta_loss_first` minus the baseline's (nats/token; < 0: forgets less),
      `d_new_gain_seed` the same for `new_gain` (< 0: learns the new domain less), each with
      a paired t-interval (`*_lo`, `*_hi`); `forgets_less_seed` / `learns_less_seed` are True
      when the whole interval is below zero; `seeds_forget_less` counts the seeds;
    - evaluation sequences: `d_forget` and `d_new_loss` (final loss on the new domain) with a
      paired percentile bootstrap over the evaluation sequences (`*_lo`, `*_hi`), training
      fixed: narrower, and not an interval for a claim about methods.

    plasticity_new = the run's loss gain on the new domain over the base (nats), divided by
    that of the "single" run (domain trained alone) of the same seed: a ratio of loss gains,
    because token accuracy can barely move on a far domain in a short run."""
    import pandas as pd

    summary = load_summary(out)
    if summary.empty:
        raise FileNotFoundError(f"no finished runs under {out}")
    ref = summary[summary["run"] == REFERENCE].set_index("seed")
    base = summary[summary["run"] == baseline].set_index("seed")
    rows = []
    for run, group in summary.groupby("run", sort=False):
        group = group.copy()
        group["plasticity_new"] = [_plasticity(out, run, s, ref) for s in group["seed"]]
        row = {"run": run, "method": group["method"].iloc[0], "lambda": group["lambda"].iloc[0],
               "variant": group["variant"].iloc[0], "n_seeds": group["seed"].nunique()}
        for k in TABLE_KEYS:
            row[k], row[f"{k}_sd"] = group[k].mean(), group[k].std()
        mine = group.set_index("seed")
        paired = sorted(set(mine.index) & set(base.index)) if run != baseline else []
        for key, col in (("delta_loss_first", "d_forget_seed"), ("new_gain", "d_new_gain_seed")):
            d = paired_t_interval([mine.at[s, key] - base.at[s, key] for s in paired], level)
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = d
        row["forgets_less_seed"] = bool(row["d_forget_seed_hi"] < 0)
        row["learns_less_seed"] = bool(row["d_new_gain_seed_hi"] < 0)
        row["seeds_forget_less"] = int(sum(mine.at[s, "delta_loss_first"] < base.at[s, "delta_loss_first"]
                                           for s in paired))
        seeds = [s for s in paired
                 if all((run_dir(out, r, s) / SEQUENCES_FILE).exists() for r in (run, baseline))]
        for q, col in (("delta_loss", "d_forget"), ("new_loss", "d_new_loss")):
            d = bootstrap_vs_baseline(out, run, seeds, q, baseline, n_boot, level) if seeds else (math.nan,) * 3
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = d
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def _crossing(lams, values, target):
    """(j, t): the first segment j of the curve (lambda ascending) on which `values` passes
    `target`, and the fraction t along it; None when the curve never reaches it."""
    for j in range(len(lams) - 1):
        v0, v1 = values[j], values[j + 1]
        if min(v0, v1) <= target <= max(v0, v1) and v0 != v1:
            return j, (target - v0) / (v1 - v0)
    return None


def _matched(out: str | Path, fraction: float, baseline: str):
    """({(method, variant): its lambda grid "l1,l2,..."} of every method swept over two or more
    lambdas, and the rows of `matched_per_seed`)."""
    import pandas as pd

    if not 0 < fraction <= 1:  # NaN fails too
        raise ValueError(f"matched gain fraction={fraction}: give a fraction in (0, 1] of the baseline's "
                         "gain, e.g. 0.9 for 90 %")
    s = load_summary(out)
    if s.empty:
        raise FileNotFoundError(f"no finished runs under {out}")
    if s["val_new_gain"].isna().all():
        raise ValueError(f"{out}: no validation numbers (R_val); run with n_val > 0")
    base = s[s["run"] == baseline].set_index("seed")
    swept, rows = {}, []
    for (method, variant), group in s[s["lambda"].notna()].groupby(["method", "variant"], sort=False):
        if group["lambda"].nunique() < 2:
            continue
        swept[method, variant] = ",".join(f"{x:g}" for x in sorted(group["lambda"].unique()))
        for seed, g in group.groupby("seed"):
            if seed not in base.index:
                continue
            g = g.sort_values("lambda")
            lams = np.log(g["lambda"].to_numpy())
            hit = _crossing(lams, g["val_new_gain"].to_numpy(), fraction * base.at[seed, "val_new_gain"])
            if hit is None:
                continue
            j, t = hit
            at = lambda col: (1 - t) * g[col].iloc[j] + t * g[col].iloc[j + 1]  # noqa: E731
            rows.append({"method": method, "variant": variant, "seed": seed, "lambdas": swept[method, variant],
                         "lambda": math.exp((1 - t) * lams[j] + t * lams[j + 1]),
                         "forget": at("delta_loss_first"), "gain": at("new_gain"),
                         "d_forget": at("delta_loss_first") - base.at[seed, "delta_loss_first"],
                         "d_gain": at("new_gain") - base.at[seed, "new_gain"],
                         "mix": ((g["run"].iloc[j], 1 - t), (g["run"].iloc[j + 1], t), (baseline, -1.0))})
    columns = ["method", "variant", "seed", "lambdas", "lambda", "forget", "gain", "d_forget", "d_gain", "mix"]
    return swept, pd.DataFrame(rows, columns=columns)


def matched_per_seed(out: str | Path, fraction: float = 0.9, baseline: str = BASELINE):
    """One row per (method, DC variant, seed) at a matched gain on the new domain: method,
    variant, seed, lambdas (the method's grid), lambda (lambda*), forget and gain (test
    `delta_loss_first` and `new_gain` at lambda*), d_forget and d_gain (minus the baseline's of
    the same seed), mix (the runs and weights that make lambda*, the baseline's at -1).

    Only methods with runs at two or more lambdas. The target is `fraction` x the baseline's
    gain on the new domain *on the validation texts* (`val_new_gain`, carved from the training
    pool); lambda* is where the method's validation gain reaches it, linear in log(lambda)
    between the two grid points around it, and the test numbers are read with the same
    weights (the test split never chooses anything). A seed whose curve never reaches the
    target, or that has no baseline run, has no row. Rows of two methods at one seed are paired:
    their difference is a comparison of the methods at matched gain."""
    return _matched(out, fraction, baseline)[1]


def matched_gain_table(out: str | Path, fraction: float = 0.9, baseline: str = BASELINE,
                       level: float = 0.95, n_boot: int = 2000):
    """Forgetting of each regularized method at a matched gain on the new domain
    (`matched_per_seed`, which says how lambda* is chosen on validation and read on test), one
    row per (method, DC variant) swept over two or more lambdas: the mean over seeds of forget
    and gain, and the difference from the baseline with a paired t-interval over seeds. Seeds
    whose curve never reaches the target are left out (`n_seeds` counts the rest, 0 when none
    reaches it). `d_forget_seq` (`_lo`, `_hi`): the same difference averaged over those seeds
    with a paired bootstrap over the evaluation sequences, training held fixed (as `cl_table`'s
    `d_forget`): the only interval one seed has, and not one for a claim about methods."""
    import pandas as pd

    swept, per_seed = _matched(out, fraction, baseline)
    rows = []
    for (method, variant), lambdas in swept.items():
        p = per_seed[(per_seed["method"] == method) & (per_seed["variant"] == variant)]
        row = {"method": method, "variant": variant, "fraction": fraction, "n_seeds": len(p), "lambdas": lambdas}
        seq = bootstrap_mix(out, list(zip(p["seed"], p["mix"])), "delta_loss", n_boot, level)
        row["d_forget_seq"], row["d_forget_seq_lo"], row["d_forget_seq_hi"] = seq
        row["lambda_star"] = float(np.exp(np.log(p["lambda"]).mean())) if len(p) else math.nan
        for col in ("forget", "gain"):
            row[col], row[f"{col}_sd"] = p[col].mean(), p[col].std()
        for col in ("d_forget", "d_gain"):
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = paired_t_interval(list(p[col]), level)
        rows.append(row)
    return pd.DataFrame(rows)


# (header, column or (mean, lo, hi) columns, format) of the README's continual-learning table
def cl_markdown(baseline: str = BASELINE) -> tuple:
    """The markdown spec of a `cl_table` whose differences are against `baseline`."""
    return (
        ("run", "run", "s"), ("λ", "lambda", "g"), ("n", "n_seeds", "d"),
        ("Δloss on first (nats/token)", ("delta_loss_first", "delta_loss_first_sd"), "+.4f"),
        ("gain on new (nats/token)", ("new_gain", "new_gain_sd"), "+.4f"),
        (f"Δ(Δloss on first) vs {baseline} [95% seed CI]", ("d_forget_seed", "d_forget_seed_lo", "d_forget_seed_hi"), "+.4f"),
        (f"Δgain on new vs {baseline} [95% seed CI]", ("d_new_gain_seed", "d_new_gain_seed_lo", "d_new_gain_seed_hi"), "+.4f"),
        ("seeds forgetting less", "seeds_forget_less", "d"),
    )


CL_MARKDOWN = cl_markdown()  # kept: the spec against sequential LoRA, as README tables print it


def matched_markdown(baseline: str = BASELINE) -> tuple:
    """The markdown spec of a `matched_gain_table` whose differences are against `baseline`."""
    return (
        ("method", "method", "s"), ("DC variant", "variant", "s"), ("λ grid", "lambdas", "s"),
        ("λ* (geo. mean)", "lambda_star", ".3g"), ("n", "n_seeds", "d"),
        ("Δloss on first at λ*", ("forget", "forget_sd"), "+.4f"),
        ("gain on new at λ* (test)", ("gain", "gain_sd"), "+.4f"),
        (f"Δ(Δloss on first) vs {baseline} [95% seed CI]", ("d_forget", "d_forget_lo", "d_forget_hi"), "+.4f"),
        (f"Δgain vs {baseline} [95% seed CI]", ("d_gain", "d_gain_lo", "d_gain_hi"), "+.4f"),
    )


MATCHED_MARKDOWN = matched_markdown()  # kept: the spec against sequential LoRA, as README tables print it


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
