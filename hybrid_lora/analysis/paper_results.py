"""The paper's table and its claims, from the result files of a results folder (no torch).

`paper_table`: per method, the mean over seeds with a 95 % t-interval of the evaluations the
paper prints (loss on A before training, after Stage 1 and after Stage 2; on B before and after
Stage 2), forgetting (A's loss after Stage 2 minus after Stage 1), accuracy retention on A, and
the trainable LoRA parameters at the end. `paper_claims`: each claim as a paired difference
over seeds (same seed, same Stage 1, same batches):
- the rank schedule: the loss on B after Stage 2 of a scheduled method (64 -> 32 -> 16) minus
  that of the same method at a fixed rank (`dylora` - `lora`, `hybrid` - `dc`), and the
  epoch-by-epoch Stage-2 evaluation loss while the rank falls;
- forgetting: each method's forgetting on A itself (a t-interval that excludes zero is
  forgetting);
- DC: `dc` - `lora` in the cosine to the Stage-1 adapter and in B's loss after Stage 2;
- the cut: a run `<run>_svdcut<anything>` (the schedule cut by SVD, `rebuild_cut`) - `<run>`.
"""
from __future__ import annotations

from pathlib import Path

from ..results import load_history, load_summary
from .stats import paired_t_interval

PAPER_COLUMNS = {  # summary.csv column -> its label in the printed table
    "A_base_loss": "A before", "A_after_stage1_loss": "A after Stage 1", "A_after_stage2_loss": "A after Stage 2",
    "B_base_loss": "B before", "B_after_stage2_loss": "B after Stage 2", "delta_loss_A": "forgetting on A",
    "retention": "retention (acc)",
}
PAIRS = (("dylora", "lora"), ("hybrid", "dc"), ("hybrid", "dylora"), ("dc", "lora"), ("lora_small", "lora"))
SVD_CUT_SUFFIX = "_svdcut"  # `run --suffix _svdcut... --set rebuild_cut=svd...`: each paired with its slicing run


def fmt(mean: float, lo: float, hi: float, digits: int = 4) -> str:
    """'mean [lo, hi]' (or the mean alone when the interval is undefined)."""
    if lo != lo:  # NaN: one seed
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def paper_table(out: str | Path):
    """The paper's table of `out`: one row per run (method), `n_seeds`, for each column of
    `PAPER_COLUMNS` its mean over seeds with the 95 % t-interval (`<col>`, `<col>_lo`,
    `<col>_hi`), and `lora_params`, the trainable LoRA parameters at the end."""
    import pandas as pd

    summary, history = load_summary(out), load_history(out)
    if summary.empty:
        raise FileNotFoundError(f"no finished runs under {out}")
    params = history.groupby(["run", "seed"])["trainable_params"].last()
    rows = []
    for run, df in summary.groupby("run", sort=False):
        row = {"run": run, "n_seeds": df["seed"].nunique()}
        for col in PAPER_COLUMNS:
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = paired_t_interval(df[col].tolist())
        row["lora_params"] = int(params.loc[run].iloc[-1])
        rows.append(row)
    return pd.DataFrame(rows)


def shown(table, columns=PAPER_COLUMNS, digits: int = 4):
    """A table of means and intervals as 'mean [lo, hi]' strings under readable labels."""
    out = table[[c for c in table.columns if c in ("run", "n_seeds", "runs", "claim", "epoch", "rank")]].copy()
    for col, label in columns.items():
        out[label] = [fmt(m, lo, hi, digits) for m, lo, hi in
                      zip(table[col], table[f"{col}_lo"], table[f"{col}_hi"])]
    if "lora_params" in table.columns:
        out["LoRA parameters"] = [f"{v:,}" for v in table["lora_params"]]
    return out


def _paired(summary, a: str, b: str, col: str) -> tuple:
    """(mean, lo, hi, n) of run a minus run b in `col`, paired by seed."""
    x = summary[summary["run"] == a].set_index("seed")[col]
    y = summary[summary["run"] == b].set_index("seed")[col]
    seeds = sorted(set(x.index) & set(y.index))
    return (*paired_t_interval([x[s] - y[s] for s in seeds]), len(seeds))


def paper_claims(out: str | Path):
    """The paper's claims as paired differences over seeds: for each pair of `PAIRS` present
    (and each `<run>_svdcut...` with its `<run>`),
    run a minus run b in B's loss after Stage 2, in forgetting on A and in the cosine to the
    Stage-1 adapter at the end; then every run's forgetting on A itself. Columns: claim, runs,
    n_seeds, diff, diff_lo, diff_hi."""
    import pandas as pd

    summary, history = load_summary(out), load_history(out)
    runs = set(summary["run"])
    cos = history[history["stage"] == 2].groupby(["run", "seed"])["cos_to_stage1"].last().rename("cos_end")
    summary = summary.join(cos, on=["run", "seed"])
    rows = []
    svd_cuts = [(r, r.split(SVD_CUT_SUFFIX)[0]) for r in sorted(runs) if SVD_CUT_SUFFIX in r]
    for a, b in PAIRS + tuple(svd_cuts):
        if {a, b} <= runs:
            for col, what in (("B_after_stage2_loss", "B loss after Stage 2"), ("delta_loss_A", "forgetting on A"),
                              ("cos_end", "cosine to Stage 1 at the end")):
                mean, lo, hi, n = _paired(summary, a, b, col)
                rows.append({"claim": what, "runs": f"{a} - {b}", "n_seeds": n, "diff": mean, "diff_lo": lo,
                             "diff_hi": hi})
    for run, df in summary.groupby("run", sort=False):
        mean, lo, hi = paired_t_interval(df["delta_loss_A"].tolist())
        rows.append({"claim": "forgetting on A (after Stage 2 - after Stage 1)", "runs": run,
                     "n_seeds": df["seed"].nunique(), "diff": mean, "diff_lo": lo, "diff_hi": hi})
    return pd.DataFrame(rows)


def stage2_curve(out: str | Path):
    """Per run and Stage-2 epoch: its rank, and the mean over seeds of the evaluation loss on B
    with its 95 % t-interval (`eval_loss`, `_lo`, `_hi`; from history.json), so the loss can be
    read against the falling rank."""
    import pandas as pd

    history = load_history(out)
    s2 = history[history["stage"] == 2]
    rows = []
    for (run, epoch), df in s2.groupby(["run", "epoch"], sort=False):
        mean, lo, hi = paired_t_interval(df["eval_loss"].tolist())
        rows.append({"run": run, "epoch": int(epoch), "rank": int(df["rank"].iloc[0]), "n_seeds": df["seed"].nunique(),
                     "eval_loss": mean, "eval_loss_lo": lo, "eval_loss_hi": hi})
    return pd.DataFrame(rows)
