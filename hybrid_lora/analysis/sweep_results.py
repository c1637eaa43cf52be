"""Rank-sweep results: the share of an adapter's gain that a cut keeps, the rank AUC on a
common log2-rank axis, and the sweep tables read from `sweep.json` files. No torch here.

    aucs = sweep_aucs(rows, base, full, r_max)   # the four rank_auc_* keys of metrics.json
    sweeps = load_sweeps(out)                     # every run's sweep rows with gain_kept
    rank_table(sweeps, 16)                        # mean and s.d. over seeds at one rank
    rank_sweep_table(sweeps, "stage1", "A")       # share kept per rank and AUC, seed-level CIs
"""
from __future__ import annotations

import math
from pathlib import Path

from ..results import SWEEP_COLUMNS, finished_runs, read_json
from .stats import paired_t_interval


def gain_share(value: float, base: float, full: float, key: str = "loss") -> float:
    """The share of an adapter's gain over the base model that a cut of it keeps: in loss
    (base - L_k) / (base - L_full), in accuracy (acc_k - base) / (acc_full - base).
    0 = the cut is no better than the base model, 1 = nothing lost. NaN when full = base."""
    gain = (base - full) if key == "loss" else (full - base)
    if gain == 0:
        return math.nan
    return ((base - value) if key == "loss" else (value - base)) / gain


def rank_auc(shares: dict[int, float], own_rank: int, r_min: int, r_max: int, whole: float = 1.0) -> float:
    """Area under the share of the gain kept ({rank: `gain_share`}) over log2(rank) from
    r_min to r_max, divided by that width: 1.0 = every cut keeps all of the gain, 0.0 = none
    does. The axis is common to every adapter of a config (r_min, r_max from the config, not
    from the adapter): from its own rank up an adapter is used whole (share `whole`: 1 when
    shares are of its own gain). Trapezoids between the swept ranks. NaN when any share is
    NaN or r_max <= r_min."""
    pts = {r: v for r, v in shares.items() if r_min <= r < own_rank}
    pts.update({r: whole for r in (own_rank, r_max) if r_min <= r <= r_max})
    if r_max <= r_min or any(math.isnan(v) for v in pts.values()):
        return math.nan
    if r_min not in pts:
        raise ValueError(f"rank_auc: no share at r_min={r_min} (ranks {sorted(shares)})")
    ranks = sorted(pts)
    xs, ys = [math.log2(r) for r in ranks], [pts[r] for r in ranks]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (math.log2(r_max) - math.log2(r_min))


def sweep_aucs(rows: list[dict], base: dict, full: dict, r_max: int, kind: str = "slice") -> dict:
    """SWEEP_KEYS from one run's sweep rows: `rank_auc` in loss and accuracy of the Stage-1
    adapter on A and the final adapter on B, cut by `kind`, on the axis [smallest swept
    rank, r_max]. `base`, `full`: {"A": {"loss", "acc"}, "B": ...}, the base model on each
    domain and the uncut adapter (Stage 1 on A, final on B) on it."""
    out = {}
    r_min = min((r["rank"] for r in rows), default=1)
    for adapter, domain in (("stage1", "A"), ("final", "B")):
        pts = [r for r in rows if (r["adapter"], r["domain"], r["kind"]) == (adapter, domain, kind)]
        for key in ("loss", "acc"):
            name = f"rank_auc_{key}_{adapter}_{domain}"
            if not pts:
                out[name] = math.nan
                continue
            shares = {p["rank"]: gain_share(p[key], base[domain][key], full[domain][key], key) for p in pts}
            out[name] = rank_auc(shares, pts[0]["adapter_rank"], r_min, r_max)
    return out


def sweep_reference(rows: list[dict]) -> tuple[dict, dict]:
    """(base, full) for `sweep_aucs` from one run's sweep rows (those with `base_loss`): the base
    model on each domain, and the uncut adapter (Stage 1 on A, final on B), on the sequences
    the sweep used: {"A": {"loss", "acc"}, "B": ...}."""
    base, full = {}, {}
    for row in rows:
        d = row["domain"]
        base[d] = {"loss": row["base_loss"], "acc": row["base_acc"]}
        if (row["adapter"], d) in (("stage1", "A"), ("final", "B")) and row["rank"] == row["adapter_rank"]:
            full[d] = {"loss": row["loss"], "acc": row["acc"]}
    return base, full


def load_sweeps(out: str | Path):
    """Every finished run's sweep.json under `out` as one DataFrame.

    Columns: run (the run folder's name, e.g. "dylora_lam0.01"), method, seed, SWEEP_COLUMNS
    (base_loss / base_acc: the base model on the sequences the row was evaluated on; from
    metrics.json for rows written before rows held it), then `gain_kept` / `loss_gain_kept`: the share of the adapter's
    own-rank gain over the base model that the cut keeps, in accuracy and in loss
    ((acc_k - acc_base) / (acc_full - acc_base), (L_base - L_k) / (L_base - L_full)).
    """
    import pandas as pd

    frames = []
    for run in finished_runs(out):
        if not (run / "sweep.json").exists():
            continue
        cfg, m = read_json(run / "config.json"), read_json(run / "metrics.json")
        df = pd.DataFrame(read_json(run / "sweep.json"), columns=list(SWEEP_COLUMNS))
        df.insert(0, "seed", cfg["seed"])
        df.insert(0, "method", cfg["method"])
        df.insert(0, "run", run.parent.name)
        # rows written before sweeps carried the base on their own sequences: the whole eval set
        old = [m.get(f"{d}_base", {}) for d in df["domain"]]
        df["base_loss"] = df["base_loss"].fillna(pd.Series([o.get("loss", math.nan) for o in old]))
        df["base_acc"] = df["base_acc"].fillna(pd.Series([o.get("acc", math.nan) for o in old]))
        frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no finished runs with a sweep.json under {out}")
    df = pd.concat(frames, ignore_index=True)
    group = ["run", "seed", "adapter", "domain", "kind", "scaling"]
    own = df[df["rank"] == df["adapter_rank"]].set_index(group)[["loss", "acc"]]
    full = own.rename(columns={"loss": "full_loss", "acc": "full_acc"})
    df = df.join(full, on=group)
    df["gain_kept"] = (df["acc"] - df["base_acc"]) / (df["full_acc"] - df["base_acc"])
    df["loss_gain_kept"] = (df["base_loss"] - df["loss"]) / (df["base_loss"] - df["full_loss"])
    return df


def rank_table(sweeps, rank: int, adapter: str = "final", domain: str = "B"):
    """Mean and s.d. over seeds at one rank, one row per (run, kind, scaling)."""
    at = sweeps[(sweeps["rank"] == rank) & (sweeps["adapter"] == adapter) & (sweeps["domain"] == domain)]
    if at.empty:
        raise ValueError(f"no sweep rows at rank {rank} for adapter={adapter!r} domain={domain!r}")
    grouped = at.groupby(["run", "kind", "scaling"], sort=False)
    table = grouped[["loss", "acc", "gain_kept", "loss_gain_kept"]].agg(["mean", "std"])
    table.insert(0, ("n_seeds", ""), grouped["seed"].nunique())
    return table


def rank_sweep_table(sweeps, adapter: str = "stage1", domain: str = "A", reference: str | None = None,
                    level: float = 0.95):
    """One row per (run, kind, scaling) of one adapter on one domain: the uncut loss (mean,
    s.d. over seeds), the share of the gain over the base model kept in loss at every swept
    rank below the largest adapter rank, and the loss `rank_auc` on the common axis [smallest
    swept rank, largest adapter or swept rank], each as mean and t-interval over seeds (`level`).

    Shares are of each adapter's own uncut gain (`loss_gain_kept`; NaN at and above its own
    rank, where it is used whole), or with `reference` (a run name) of that run's uncut gain
    with the same seed: then cuts of different adapters compare on one scale, ranks at and
    above an adapter's own show its uncut share, and `uncut` is that share. A share above 1:
    better than the uncut adapter (or the reference). A run swept at no rank below its own (a
    per-rank reference of `run --ranks`, swept at its own rank only) has no cut and no row."""
    import pandas as pd

    at = sweeps[(sweeps["adapter"] == adapter) & (sweeps["domain"] == domain)]
    if at.empty:
        raise ValueError(f"no sweep rows for adapter={adapter!r} domain={domain!r}")
    if reference is not None:
        ref = at[(at["run"] == reference) & (at["rank"] == at["adapter_rank"])].groupby("seed")["loss"].first()
        if ref.empty:
            raise ValueError(f"reference run {reference!r} has no sweep rows for {adapter} on {domain} "
                             f"(runs: {sorted(at['run'].unique())})")
    ranks = sorted(int(r) for r in at["rank"].unique())
    r_max = max(ranks + [int(r) for r in at["adapter_rank"].unique()])
    rows = []
    for (run, kind, scaling), g in at.groupby(["run", "kind", "scaling"], sort=False):
        per_seed = []
        for seed, s in g.groupby("seed"):
            own, full = int(s["adapter_rank"].iloc[0]), s["full_loss"].iloc[0]
            if not (s["rank"] < own).any():  # uncut only: nothing to share out
                continue
            if reference is None:
                shares, whole = dict(zip(s["rank"].astype(int), s["loss_gain_kept"])), 1.0
            elif seed in ref.index:
                base = s["base_loss"].iloc[0]
                gain = base - ref[seed]
                shares, whole = {int(k): (base - v) / gain for k, v in zip(s["rank"], s["loss"])}, (base - full) / gain
            else:
                continue
            shown = {k: shares.get(k, math.nan) if k < own else (whole if reference else math.nan) for k in ranks}
            per_seed.append({"seed": seed, "full_loss": full, "own": own, "whole": whole,
                             "auc": rank_auc(shares, own, ranks[0], r_max, whole), **shown})
        if not per_seed:
            continue
        p = pd.DataFrame(per_seed)
        row = {"run": run, "kind": kind, "scaling": scaling, "n_seeds": len(p),
               "adapter_rank": int(p["own"].max()), "full_loss": p["full_loss"].mean(),
               "full_loss_sd": p["full_loss"].std()}
        if reference is not None:
            row["uncut"], row["uncut_lo"], row["uncut_hi"] = paired_t_interval(list(p["whole"]), level)
        for k in ranks:
            if k < r_max:
                row[f"kept_{k}"], row[f"kept_{k}_lo"], row[f"kept_{k}_hi"] = paired_t_interval(list(p[k]), level)
        row["auc"], row["auc_lo"], row["auc_hi"] = paired_t_interval(list(p["auc"]), level)
        rows.append(row)
    return pd.DataFrame(rows)


def rank_sweep_markdown_spec(table) -> tuple:
    """The `markdown.markdown_table` spec of a `rank_sweep_table`: one column per swept rank."""
    ranks = [c[len("kept_"):] for c in table.columns if c.startswith("kept_") and c.count("_") == 1]
    return (("run", "run", "s"), ("cut", "kind", "s"), ("scaling", "scaling", "s"), ("n", "n_seeds", "d"),
            ("r", "adapter_rank", "d"), ("uncut loss", ("full_loss", "full_loss_sd"), ".4f"),
            *((("uncut kept", ("uncut", "uncut_lo", "uncut_hi"), ".2f"),) if "uncut" in table.columns else ()),
            *((f"kept at {k}", (f"kept_{k}", f"kept_{k}_lo", f"kept_{k}_hi"), ".2f") for k in ranks),
            ("loss AUC", ("auc", "auc_lo", "auc_hi"), ".3f"))


rank_flex_table = rank_sweep_table  # its old name, still exported by hybrid_lora
