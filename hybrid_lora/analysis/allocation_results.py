"""The allocation study's tables and the rank maps behind its figures. No torch; reads result folders.

`allocation_table` compares, at one trainable-parameter budget, every run of an allocating
method (`dynamic` and its `--suffix` variants, `adalora`), the uniform LoRA at the budget (the
baseline, `lora_small`) and plain LoRA at rank r cut to the budget after training (its sweep:
`svd` = every module at the budget's rank, `svd_alloc` = one global singular-value threshold).
For each: the Stage-1 adapter on the first domain, the final adapter on the last domain and on
the first, in loss and accuracy (a one-domain study, e.g. the allocation study on code alone,
has only the one point `final_last`); the mean over seeds and the paired difference from the
baseline (same seed) with a t-interval over seeds; and the adapter's parameters at the end of
each stage (allocated: kept components, frozen included; LoRA cut by SVD: the budget, an upper
bound); and the time ratio, the run's fastest training epoch over that of plain LoRA at rank r
(the same adapter shape; same seed, t-interval), which measures what allocating costs per step
(NaN for the SVD cuts, which train nothing of their own).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..results import ALLOCATION_FILE, PER_INPUT_FILE, finished_runs, read_json, train_seconds
from .stats import paired_t_interval

POINTS = (("stage1_first", "A_after_stage1"), ("final_last", "B_after_stage2"), ("final_first", "A_after_stage2"))


def _params(run: Path) -> dict[str, float]:
    """{"stage1", "final"}: the adapter's parameters at the end of Stage 1 and of the run."""
    if (run / ALLOCATION_FILE).exists():
        epochs = read_json(run / ALLOCATION_FILE)["epochs"]
        at = {e["stage"]: e["params"] + e["frozen_params"] for e in epochs}
        return {"stage1": at[1], "final": at[max(at)]}
    history = read_json(run / "history.json")
    at = {h["stage"]: h["trainable_params"] for h in history}
    return {"stage1": at[1], "final": at[max(at)]}


def _points(run: Path) -> dict[str, dict]:
    """{point: {"loss", "acc"}} of a run (POINTS; a one-domain run: its domain at the end, "final_last")."""
    m = read_json(run / "metrics.json")
    if len(m["R"]["domains"]) == 1:
        return {"final_last": {x: m["R"][x][-1][0] for x in ("loss", "acc")}}
    return {name: m[key] for name, key in POINTS}


def _cut_points(run: Path, kind: str, rank: int, n_domains: int) -> dict[str, dict] | None:
    """The run's adapters cut by `kind` at `rank` from its sweep.json, or None if not swept."""
    if not (run / "sweep.json").exists():
        return None
    rows = {(r["adapter"], r["domain"]): r for r in read_json(run / "sweep.json")
            if r["kind"] == kind and r["rank"] == rank}
    where = ({"final_last": ("stage1", "A")} if n_domains == 1  # a one-domain run's adapter is swept as "stage1"
             else {"stage1_first": ("stage1", "A"), "final_last": ("final", "B"), "final_first": ("final", "A")})
    if not all(w in rows for w in where.values()):
        return None
    return {name: {"loss": rows[w]["loss"], "acc": rows[w]["acc"]} for name, w in where.items()}


def study_runs(out: str | Path, baseline: str = "lora_small", svd_run: str = "lora") -> dict:
    """{label: {seed: {"points": {point: {"loss", "acc"}}, "params": {...}}}} for the runs the
    table compares; the budget's rank is read from the baseline's config (rank_schedule[-1])."""
    found = {}
    budget_rank = None
    for run in finished_runs(out):
        cfg = read_json(run / "config.json")
        name, seed = run.parent.name, cfg["seed"]
        if name == baseline:
            budget_rank = cfg["rank_schedule"][-1]
        if (run / ALLOCATION_FILE).exists() or name == baseline:
            found.setdefault(name, {})[seed] = {"points": _points(run), "params": _params(run)}
    for run in finished_runs(out):
        cfg = read_json(run / "config.json")
        if run.parent.name != svd_run or budget_rank is None:
            continue
        full = _params(run)
        for kind in ("svd", "svd_alloc"):
            cut = _cut_points(run, kind, budget_rank, len(cfg["domains"]))
            if cut is not None:
                bound = {k: v * budget_rank / cfg["r"] for k, v in full.items()}
                found.setdefault(f"{svd_run} {kind}@{budget_rank}", {})[cfg["seed"]] = {"points": cut, "params": bound}
    return found


def allocation_table(out: str | Path, baseline: str = "lora_small", svd_run: str = "lora", level: float = 0.95):
    """One row per compared run (see the module docstring); differences from `baseline`."""
    import pandas as pd

    runs = study_runs(out, baseline, svd_run)
    if baseline not in runs:
        raise FileNotFoundError(f"no finished {baseline!r} runs under {out}: the baseline of the table")
    base = runs[baseline]
    seconds = train_seconds(out)
    points = [p for p, _ in POINTS if p in next(iter(base.values()))["points"]]
    rows = []
    for label, per_seed in runs.items():
        seeds = sorted(s for s in per_seed if s in base)
        row = {"run": label, "n_seeds": len(seeds)}
        for point in points:
            for x in ("loss", "acc"):
                vals = [per_seed[s]["points"][point][x] for s in seeds]
                row[f"{point}_{x}"] = sum(vals) / len(vals) if vals else math.nan
                diffs = [per_seed[s]["points"][point][x] - base[s]["points"][point][x] for s in seeds]
                mean, lo, hi = paired_t_interval(diffs, level) if label != baseline else (0.0, 0.0, 0.0)
                row[f"{point}_{x}_diff"], row[f"{point}_{x}_lo"], row[f"{point}_{x}_hi"] = mean, lo, hi
        for stage in ("stage1", "final"):
            vals = [per_seed[s]["params"][stage] for s in seeds]
            row[f"params_{stage}"] = sum(vals) / len(vals) if vals else math.nan
        ratios = [seconds[label, s] / seconds[svd_run, s] for s in seeds
                  if (label, s) in seconds and (svd_run, s) in seconds]
        row["time"], row["time_lo"], row["time_hi"] = paired_t_interval(ratios, level)
        rows.append(row)
    return pd.DataFrame(rows)


def rank_maps(out: str | Path, run: str) -> dict:
    """{"modules", "epochs": [(stage, epoch)], "ranks": per epoch the per-module rank averaged
    over the seeds of `run`} from its allocation.json files."""
    files = [read_json(p / ALLOCATION_FILE) for p in finished_runs(out)
             if p.parent.name == run and (p / ALLOCATION_FILE).exists()]
    if not files:
        raise FileNotFoundError(f"no finished {run!r} runs with {ALLOCATION_FILE} under {out}")
    epochs = [(e["stage"], e["epoch"]) for e in files[0]["epochs"]]
    ranks = [[sum(f["epochs"][i]["ranks"][m] for f in files) / len(files)
              for m in range(len(files[0]["modules"]))] for i in range(len(epochs))]
    return {"modules": files[0]["modules"], "epochs": epochs, "ranks": ranks, "n_seeds": len(files)}


def per_input_table(out: str | Path, run: str, level: float = 0.95):
    """Rank per input against fixed and random ranks at the same average, from the
    `per_input.json` of every seed of `run`: one row per (domain, target average) with each
    policy's mean loss and accuracy and the realized average rank, and the paired differences
    feature - fixed and feature - random (same seed) with t-intervals over seeds."""
    import pandas as pd

    per_seed = {}
    for path in finished_runs(out):
        if path.parent.name == run and (path / PER_INPUT_FILE).exists():
            for r in read_json(path / PER_INPUT_FILE)["rows"]:
                per_seed.setdefault((r["domain"], r["target_avg"]), {}).setdefault(r["policy"], {})[path.name] = r
    if not per_seed:
        raise FileNotFoundError(f"no {PER_INPUT_FILE} in the finished {run!r} runs under {out}: "
                                "run `python -m hybrid_lora per-input --run <run folder>` first")
    rows = []
    for (domain, avg), policies in per_seed.items():
        seeds = sorted(set.intersection(*(set(v) for v in policies.values())))
        row = {"domain": domain, "target_avg": avg, "n_seeds": len(seeds)}
        for name, by_seed in policies.items():
            for x in ("loss", "acc", "avg_rank"):
                row[f"{name}_{x}"] = sum(by_seed[s][x] for s in seeds) / len(seeds)
        for other in ("fixed", "random"):
            for x in ("loss", "acc"):
                diffs = [policies["feature"][s][x] - policies[other][s][x] for s in seeds]
                mean, lo, hi = paired_t_interval(diffs, level)
                row[f"feature_vs_{other}_{x}"], row[f"feature_vs_{other}_{x}_lo"], row[f"feature_vs_{other}_{x}_hi"] = mean, lo, hi
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["domain", "target_avg"]).reset_index(drop=True)


# (header, column or (mean, lo, hi) columns, format): `markdown.markdown_table` of a per_input_table
PER_INPUT_MARKDOWN = (
    ("domain", "domain", "s"), ("target avg rank", "target_avg", "d"), ("n", "n_seeds", "d"),
    ("avg rank given (feature)", "feature_avg_rank", ".2f"), ("loss, fixed", "fixed_loss", ".4f"),
    ("loss, feature", "feature_loss", ".4f"),
    ("feature - fixed (loss) [95% seed CI]", ("feature_vs_fixed_loss", "feature_vs_fixed_loss_lo",
                                              "feature_vs_fixed_loss_hi"), "+.4f"),
    ("feature - random (loss) [95% seed CI]", ("feature_vs_random_loss", "feature_vs_random_loss_lo",
                                               "feature_vs_random_loss_hi"), "+.4f"),
    ("feature - fixed (acc) [95% seed CI]", ("feature_vs_fixed_acc", "feature_vs_fixed_acc_lo",
                                             "feature_vs_fixed_acc_hi"), "+.4f"),
)


def allocation_markdown(table, x: str = "loss") -> str:
    """The table in markdown: per point the mean and the difference from the baseline [CI]."""
    points = [p for p, _ in POINTS if f"{p}_{x}" in table.columns]
    head = ["run", "n"] + [f"{p} {x}" for p in points] + ["params (final)", "time / LoRA at r [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        r = r._asdict()
        cells = [r["run"], str(r["n_seeds"])]
        for p in points:
            d, lo, hi = r[f"{p}_{x}_diff"], r[f"{p}_{x}_lo"], r[f"{p}_{x}_hi"]
            diff = "" if lo == hi == 0.0 else f" ({d:+.4f} [{lo:+.4f}, {hi:+.4f}])"
            cells.append(f"{r[f'{p}_{x}']:.4f}{diff}")
        cells.append(f"{r['params_final']:,.0f}")
        cells.append("—" if r["time"] != r["time"] else f"{r['time']:.2f} [{r['time_lo']:.2f}, {r['time_hi']:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
