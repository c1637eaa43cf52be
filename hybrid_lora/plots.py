"""Figures from result files only (no training, no GPU). Each function returns a Figure.

    summary = load_summary(out); history = load_history(out)   # hybrid_lora.results
    plot_stage_history(history, "hybrid", 42); plot_method_comparison(summary); plot_cos_to_stage1(history)
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

from .config import METHOD_NAMES

STAGE_COLUMNS = (("A_after_stage1", "A after Stage 1"), ("A_after_stage2", "A after Stage 2"),
                 ("B_after_stage2", "B after Stage 2"))


def plot_stage_history(history, method: str, seed: int):
    """Loss (left) and accuracy (right) per epoch of one run (`method`: its run name, e.g.
    "dc" or "dc_lam1"), all stages; rank changes marked."""
    run = history[(history["run"] == method) & (history["seed"] == seed)].sort_values("step")
    if run.empty:
        raise ValueError(f"no history rows for run={method!r} seed={seed}")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    ax_loss.plot(run["step"], run["train_ce"], "o-", label="train CE")
    ax_loss.plot(run["step"], run["eval_loss"], "s-", label="eval loss (current domain)")
    if run["val_loss"].notna().any():
        ax_loss.plot(run["step"], run["val_loss"], "d--", label="validation loss (current domain)")
    ax_acc.plot(run["step"], run["eval_acc"], "^-", color="tab:green", label="eval token accuracy")
    for ax in (ax_loss, ax_acc):
        for stage in sorted(run["stage"].unique())[1:]:
            ax.axvline(run.loc[run["stage"] == stage, "step"].iloc[0] - 0.5, color="grey", ls="--", lw=1,
                       label="start of a new stage" if stage == 2 else None)
        prev = None
        for step, rank in zip(run["step"], run["rank"]):
            if rank != prev:
                ax.annotate(f"r={rank}", (step, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                            fontsize=8, color="tab:red")
            prev = rank
        ax.set_xlabel("epoch (Stage 1, Stage 2, ...)" if run["stage"].nunique() > 1 else "Stage-1 epoch")
        ax.set_xticks(list(run["step"]))
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_acc.set_ylabel("next-token accuracy")
    fig.suptitle(f"{method}, seed {seed}: training history (LoRA rank marked above each change)")
    fig.tight_layout()
    return fig


def plot_val_curves(history, title: str = ""):
    """Validation loss per epoch of every run with validation texts, one line per run and seed
    (e.g. a learning-rate grid: where each rate's curve stops falling chooses the epochs)."""
    rows = history[history["val_loss"].notna()]
    if rows.empty:
        raise ValueError("no history rows with val_loss (runs made with n_val = 0)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = [(key, g.sort_values("step")) for key, g in rows.groupby(["run", "seed"], sort=True)]
    low = rows["val_loss"].min()
    top = max(g["val_loss"].iloc[0] for _, g in groups)  # a diverging run would flatten the rest
    top += 0.25 * (top - low) or 0.1
    for (run, seed), g in groups:
        off = g["val_loss"].max() > top
        ax.plot(g["step"], g["val_loss"], "o-",
                label=f"{run}, seed {seed}" + (f" (off the scale: up to {g['val_loss'].max():.2f})" if off else ""))
    ax.set_ylim(low - 0.1 * (top - low), top)
    ax.set_xlabel("epoch (across stages)")
    ax.set_xticks(sorted(rows["step"].unique()))
    ax.set_ylabel("validation cross-entropy (nats / token)")
    ax.set_title(title or "validation loss per epoch (lower is better)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_method_comparison(summary, metric: str = "acc"):
    """Bars per method for A after Stage 1, A after Stage 2 and B after Stage 2; mean +- std over seeds."""
    if metric not in ("acc", "loss"):
        raise ValueError(f"metric={metric!r}: 'acc' or 'loss'")
    present = list(dict.fromkeys(summary["method"]))
    methods = [m for m in METHOD_NAMES if m in present] + [m for m in present if m not in METHOD_NAMES]
    grouped = summary.groupby("method", sort=False)
    width = 0.8 / len(STAGE_COLUMNS)
    fig, ax = plt.subplots(figsize=(1.8 * len(methods) + 3, 4))
    for j, (key, label) in enumerate(STAGE_COLUMNS):
        col = f"{key}_{metric}"
        mean = grouped[col].mean().reindex(methods)
        std = grouped[col].std(ddof=1).reindex(methods).fillna(0.0)  # one seed: no spread to show
        xs = [i + (j - 1) * width for i in range(len(methods))]
        ax.bar(xs, mean, width, yerr=std, capsize=3, label=label)
    n_seeds = grouped["seed"].nunique().reindex(methods)
    ax.set_xticks(range(len(methods)), [f"{m}\n(n={n})" for m, n in zip(methods, n_seeds)])
    ax.set_xlabel("method (n = number of seeds)")
    ax.set_ylabel("next-token accuracy" if metric == "acc" else "cross-entropy (nats / token)")
    ax.set_title("Domain A before and after Stage 2, domain B after Stage 2 (mean ± s.d. over seeds)")
    if metric == "acc":
        lo = min(summary[f"{k}_acc"].min() for k, _ in STAGE_COLUMNS)
        ax.set_ylim(max(0.0, lo * 0.9), None)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_cos_to_stage1(history):
    """Cosine of the adapter to the (rank-cut) Stage-1 adapter per Stage-2 epoch; mean +- std over seeds."""
    stage2 = history[history["stage"] == 2]
    if stage2.empty:
        raise ValueError("no Stage-2 rows in history")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in stage2.groupby("run", sort=False):
        if rows["cos_to_stage1"].isna().all():  # freeze-and-add, single: a new adapter
            continue
        by_epoch = rows.groupby("epoch")["cos_to_stage1"]
        mean, std = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)
        ax.errorbar(mean.index, mean.values, yerr=std.values, marker="o", capsize=3, label=method)
    ax.set_xlabel("Stage-2 epoch")
    ax.set_xticks(sorted(stage2["epoch"].unique()))
    ax.set_ylabel("cosine similarity to Stage-1 adapter")
    ax.set_title("Drift of the adapter during Stage 2")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _finish(fig, ax, title: str, legend_size: int = 8):
    """Title (10 pt), legend, grid and tight layout of a one-axes figure; returns `fig`."""
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=legend_size, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_stage2_curve(curve, title: str = ""):
    """The paper's Stage-2 curve from `analysis.paper_results.stage2_curve`: evaluation loss on
    B per Stage-2 epoch of every run, mean with its 95 % t-interval over seeds (none for one
    seed), the LoRA rank of each epoch written beside its point."""
    if curve.empty:
        raise ValueError("no Stage-2 rows (runs of one stage only)")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (run, g) in enumerate(curve.groupby("run", sort=False)):
        g = g.sort_values("epoch")
        err = [(g["eval_loss"] - g["eval_loss_lo"]).fillna(0.0), (g["eval_loss_hi"] - g["eval_loss"]).fillna(0.0)]
        ax.errorbar(g["epoch"], g["eval_loss"], yerr=err, color=f"C{i % 10}", marker="o", capsize=3,
                    label=f"{run} (n = {int(g['n_seeds'].min())})")
        for epoch, loss, rank in zip(g["epoch"], g["eval_loss"], g["rank"]):
            ax.annotate(f"r={rank}", (epoch, loss), xytext=(5, 2), textcoords="offset points",
                        fontsize=7, color=f"C{i % 10}")
    ax.set_xticks(sorted(curve["epoch"].unique()))
    ax.margins(x=0.08)  # room for the last epoch's rank labels
    ax.set_xlabel("Stage-2 epoch (the LoRA rank of each epoch beside its point)")
    ax.set_ylabel("evaluation loss on B (nats / token)")
    return _finish(fig, ax, title or "Stage 2: loss on the new domain while the rank falls (mean, 95 % CI over seeds)")


def plot_rank_sweep(sweeps, adapter: str = "final", domain: str = "B", svd_methods=("lora",)):
    """Loss (left) and accuracy (right) versus rank (log2 axis) of one adapter on one domain,
    every run sliced, and SVD-truncated for the runs of `svd_methods` (the baselines; all
    when None); mean +- s.d. over seeds. Solid: slicing; dashed: SVD."""
    rows = sweeps[(sweeps["adapter"] == adapter) & (sweeps["domain"] == domain)]
    if rows.empty:
        raise ValueError(f"no sweep rows for adapter={adapter!r} domain={domain!r}")
    if svd_methods is not None:
        rows = rows[(rows["kind"] != "svd") | rows["method"].isin(svd_methods)]
    present = list(dict.fromkeys(rows["run"]))
    runs = [m for m in METHOD_NAMES if m in present] + [m for m in present if m not in METHOD_NAMES]
    colors = {m: f"C{i % 10}" for i, m in enumerate(runs)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for (run, kind, scaling), g in rows.groupby(["run", "kind", "scaling"], sort=False):
        label = f"{run} ({'SVD' if kind == 'svd' else 'slice, ' + scaling})"
        for ax, col in zip(axes, ("loss", "acc")):
            by_rank = g.groupby("rank")[col]
            mean, std = by_rank.mean(), by_rank.std(ddof=1).fillna(0.0)
            ax.errorbar(mean.index, mean.values, yerr=std.values, color=colors[run], capsize=2,
                        ls="--" if kind == "svd" else ("-" if runs.index(run) < 10 else ":"),
                        marker="o" if kind == "slice" else "x", ms=4, label=label)
    _rank_axes(axes, sorted(rows["rank"].unique()), domain, "rank kept (log2 axis; no retraining)")
    n = rows.groupby("run")["seed"].nunique()
    fig.suptitle(f"{'Stage-1' if adapter == 'stage1' else 'Final'} adapter cut to each rank, domain {domain} "
                 f"(mean ± s.d. over {n.min()}{'' if n.min() == n.max() else '-' + str(n.max())} seeds)")
    fig.tight_layout()
    return fig


def _rank_axes(axes, ranks, domain: str, xlabel: str) -> None:
    """Loss (left) and accuracy (right) axes over a log2 rank axis ticked at `ranks`."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"eval loss on {domain} (nats / token)")
    axes[1].set_ylabel(f"next-token accuracy on {domain}")
    axes[1].legend(fontsize=7, loc="lower right")


def plot_rank_flex(out, adapter: str = "stage1", domain: str = "A", reference: str = "lora"):
    """The rank-flexibility benchmark of one adapter on one domain: loss (left) and accuracy
    (right) versus rank (log2 axis) of every compared adapter cut to each rank (the lambda chosen
    on validation texts only; mean over seeds), and the LoRA trained at each rank as points with
    95 % t-intervals over seeds."""
    from .analysis.rank_flex import rank_flex_benchmark, reference_points
    from .analysis.sweep_results import load_sweeps

    table, _ = rank_flex_benchmark(out, adapter, domain, reference)
    sweeps = load_sweeps(out)
    rows = sweeps[(sweeps["adapter"] == adapter) & (sweeps["domain"] == domain)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for i, t in enumerate(table[table["chosen"]].itertuples()):
        g = rows[(rows["run"] == t.run) & (rows["kind"] == t.kind) & (rows["scaling"] == t.scaling)]
        for ax, col in zip(axes, ("loss", "acc")):
            mean = g.groupby("rank")[col].mean()
            ax.plot(mean.index, mean.values, color=f"C{i % 10}", ls="--" if t.kind == "svd" else "-",
                    marker="o", ms=4, label=f"{t.run} ({'SVD' if t.kind == 'svd' else 'slice'})")
    points = reference_points(sweeps, adapter, domain, reference)
    for ax, col in zip(axes, ("loss", "acc")):
        p = points[points["metric"] == col]
        ax.errorbar(p["rank"], p["mean"], yerr=[p["mean"] - p["lo"], p["hi"] - p["mean"]], fmt="s",
                    color="black", ms=6, capsize=3, label=f"{reference} trained at each rank (95 % CI)")
    _rank_axes(axes, sorted(points["rank"].unique()), domain, "rank (log2 axis)")
    fig.suptitle(f"{'Stage-1' if adapter == 'stage1' else 'Final'} adapter on {domain}: one adapter cut "
                 f"to each rank against a LoRA trained at that rank ({int(table['n_seeds'].max())} seeds)")
    fig.tight_layout()
    return fig


def plot_pareto(table, title: str = ""):
    """Forgetting on the first domain (y) versus gain on the new domain (x), one point per row
    of `cl_results.cl_table` (a method, or one lambda of a sweep), error bars = s.d. over seeds;
    the lambdas of one method (and DC variant) are joined by a line and labelled. Lower right is
    better."""
    if table.empty:
        raise ValueError("empty table: no runs to plot")
    label = table["method"] + table["variant"].map(
        lambda v: f" ({v})" if isinstance(v, str) and v not in ("", "global") else "")
    present = list(dict.fromkeys(label))
    methods = sorted(present, key=lambda m: METHOD_NAMES.index(m.split()[0]) if m.split()[0] in METHOD_NAMES else 99)
    tab20 = plt.get_cmap("tab20")  # 20 distinct colours: the dark ten first, then the light ones
    palette = [tab20(j) for j in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, method in enumerate(methods):
        rows = table[label == method].sort_values("lambda")
        ax.errorbar(rows["new_gain"], rows["delta_loss_first"], xerr=rows["new_gain_sd"].fillna(0.0),
                    yerr=rows["delta_loss_first_sd"].fillna(0.0), color=palette[i % len(palette)],
                    marker="os^vD<>ph*"[i % 10], ms=6, capsize=3, ls="-" if len(rows) > 1 else "none",
                    label=f"{method} (n={rows['n_seeds'].min()})")
        for lam, x, y in zip(rows["lambda"], rows["new_gain"], rows["delta_loss_first"]):
            if lam == lam:  # not NaN: a method with a lambda
                ax.annotate(f"λ={lam:g}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.axhline(0.0, color="grey", lw=1, ls=":")
    ax.set_xlabel("gain on the new domain: base loss − final loss (nats / token)")
    ax.set_ylabel("forgetting on the first domain:\nfinal loss − loss after its stage (nats / token)")
    return _finish(fig, ax, title or "Learning versus forgetting (mean ± s.d. over seeds; lower right is better)", 7)


def plot_rank_map(maps: dict, run: str):
    """Heat map of `allocation_results.rank_maps`: module (rows) x epoch (columns), colour and
    number the rank kept, averaged over seeds."""
    import numpy as np

    ranks = np.asarray(maps["ranks"]).T  # [modules, epochs]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * ranks.shape[1], 1.0 + 0.32 * ranks.shape[0]))
    im = ax.imshow(ranks, aspect="auto", cmap="viridis", vmin=0)
    for (m, e), v in np.ndenumerate(ranks):
        ax.text(e, m, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < ranks.max() / 2 else "k")
    ax.set_xticks(range(ranks.shape[1]), [f"S{s} E{e}" for s, e in maps["epochs"]])
    ax.set_yticks(range(ranks.shape[0]), maps["modules"], fontsize=7)
    ax.set_xlabel("stage and epoch (end of epoch)")
    ax.set_ylabel("adapted module")
    fig.colorbar(im, ax=ax, label="rank kept")
    ax.set_title(f"{run}: ranks allocated per module\n(mean over {maps['n_seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_per_input(table, run: str):
    """Rank per input against fixed and random ranks at the same average, from
    `allocation_results.per_input_table`: per domain (columns), the mean loss over seeds against
    the average rank given (top), and the paired differences feature - fixed and
    feature - random with their 95 % seed intervals (bottom; below 0 the feature helps)."""
    domains = sorted(table["domain"].unique())
    fig, axes = plt.subplots(2, len(domains), figsize=(5 * len(domains), 7), squeeze=False, sharex="col")
    for j, domain in enumerate(domains):
        t = table[table["domain"] == domain].sort_values("target_avg")
        top, bottom = axes[0, j], axes[1, j]
        for policy, marker in (("fixed", "s"), ("feature", "o"), ("random", "^")):
            top.plot(t[f"{policy}_avg_rank"], t[f"{policy}_loss"], marker=marker, label=policy)
        for k, (other, marker) in enumerate((("fixed", "s"), ("random", "^"))):
            d, lo, hi = (t[f"feature_vs_{other}_loss{x}"] for x in ("", "_lo", "_hi"))
            x = t["target_avg"] * (1.04 if k else 1 / 1.04)  # side by side on the log axis
            bottom.errorbar(x, d, yerr=[d - lo, hi - d], fmt=marker, capsize=3, label=f"feature − {other}")
        bottom.axhline(0.0, color="grey", lw=1, ls=":")
        top.set_title(f"{domain} ({int(t['n_seeds'].min())} seeds)")
        top.set_ylabel("loss (nats / token), mean over seeds")
        bottom.set_ylabel("paired difference in loss\n(nats / token, 95 % seed CI)")
        bottom.set_xlabel("average rank (log2 axis; top: as given, bottom: the target)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{run}: rank chosen per input against one rank for every input, at the same average")
    fig.tight_layout()
    return fig


def plot_rank_share(out, adapter: str = "stage1", domain: str = "A", reference: str = "lora", goal: float = 0.98):
    """The share of the per-rank reference's loss gain that each compared cut keeps, against
    rank (log2 axis): one line per row of `rank_flex_benchmark` chosen on validation texts, its
    mean with 95 % t-intervals over seeds as error bars (lines shifted a little sideways so
    the bars do not overlap), and the line at `goal`."""
    from .analysis.rank_flex import rank_flex_benchmark

    table, _ = rank_flex_benchmark(out, adapter, domain, reference)
    ranks = [int(c[len("kept_"):]) for c in table.columns if c.startswith("kept_") and c.count("_") == 1]
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = table[table["chosen"]].sort_values("aurac", ascending=False)
    for i, t in enumerate(rows.itertuples()):
        mean = [getattr(t, f"kept_{k}") for k in ranks]
        dodge = 2 ** (0.04 * (i - (len(rows) - 1) / 2))  # side by side, so the intervals stay apart
        err = [[m - getattr(t, f"kept_{k}_lo") for k, m in zip(ranks, mean)],
               [getattr(t, f"kept_{k}_hi") - m for k, m in zip(ranks, mean)]]
        ax.errorbar([k * dodge for k in ranks], mean, yerr=err, color=f"C{i % 10}", ls="--" if t.kind == "svd" else "-",
                    marker="o", ms=4, capsize=3,
                    label=f"{t.run} ({'SVD' if t.kind == 'svd' else 'slice'}), AURAC {t.aurac:.3f}")
    ax.axhline(goal, color="black", ls=":", lw=1, label=f"goal: {goal:g} of the reference at every rank")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank the adapter is cut to (log2 axis)")
    ax.set_ylabel(f"share of the gain of {reference} trained at that rank (loss on {domain})")
    ax.set_ylim(max(-0.1, min(0.0, ax.get_ylim()[0])), 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{'Stage-1' if adapter == 'stage1' else 'Final'} adapter on {domain}: share kept at each rank "
                 f"(mean, 95 % CI over {int(table['n_seeds'].max())} seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Save as PNG (150 dpi), creating folders, through a temporary file: an interruption or a
    full disk (`results.DiskFull`) never leaves a half-written figure; returns the path."""
    from .results import disk_errors

    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"cannot write figures into {path.parent}: it is a file, not a folder")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, dpi=150, format="png")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def plot_all(out: str | Path, image_dir: str | Path, only: tuple[str, ...] = ()) -> list[Path]:
    """Redraw every figure of the results folder `out` into `image_dir` (with `only`, just
    those whose file name starts with one of its entries, e.g. ("pareto",)); returns the PNG paths."""
    from .analysis.allocation_results import per_input_table, rank_maps
    from .analysis.cl_results import BASELINE, cl_table
    from .analysis.paper_results import stage2_curve
    from .methods import get_method
    from .results import ALLOCATION_FILE, PER_INPUT_FILE, load_history, load_summary
    from .analysis.sweep_results import load_sweeps

    summary, history = load_summary(out), load_history(out)
    paths = []

    def want(name: str) -> bool:
        return not only or name.startswith(tuple(only))

    if summary["A_after_stage2_acc"].notna().any():  # two-domain runs
        for metric in ("acc", "loss"):
            if want(f"methods_{metric}"):
                paths.append(save_figure(plot_method_comparison(summary, metric),
                                         Path(image_dir) / f"methods_{metric}.png"))
    if history["val_loss"].notna().any() and want("val_curves"):
        paths.append(save_figure(plot_val_curves(history), Path(image_dir) / "val_curves.png"))
    if history["cos_to_stage1"].notna().any() and want("cos_to_stage1"):
        paths.append(save_figure(plot_cos_to_stage1(history), Path(image_dir) / "cos_to_stage1.png"))
    if (summary["method"].map(lambda m: get_method(m).scheduled).any() and (history["stage"] == 2).any()
            and want("stage2_curve")):  # the paper's rank schedule
        paths.append(save_figure(plot_stage2_curve(stage2_curve(out)), Path(image_dir) / "stage2_curve.png"))
    if ((summary["run"] == BASELINE).any() and summary["run"].nunique() > 1
            and summary["delta_loss_first"].notna().any() and want("pareto")):  # schema 2: no R
        domains = " → ".join(summary["domains"].iloc[0].split(">"))
        paths.append(save_figure(plot_pareto(cl_table(out), f"{domains}: learning versus forgetting "
                                             "(mean ± s.d. over seeds; lower right is better)"),
                                 Path(image_dir) / "pareto.png"))
    for (run, seed), _ in history.groupby(["run", "seed"], sort=False):
        if want(f"history_{run}_seed{seed}"):
            paths.append(save_figure(plot_stage_history(history, run, seed),
                                     Path(image_dir) / f"history_{run}_seed{seed}.png"))
    def runs_with(name: str) -> list[str]:  # runs with a finished seed that wrote file `name`
        return sorted({p.parent.parent.name for p in Path(out).glob(f"*/seed*/{name}")
                       if (p.parent / "metrics.json").exists()})

    for run in runs_with(ALLOCATION_FILE):
        if want(f"rank_map_{run}"):
            paths.append(save_figure(plot_rank_map(rank_maps(out, run), run), Path(image_dir) / f"rank_map_{run}.png"))
    for run in runs_with(PER_INPUT_FILE):
        if want(f"per_input_{run}"):
            paths.append(save_figure(plot_per_input(per_input_table(out, run), run),
                                     Path(image_dir) / f"per_input_{run}.png"))
    if only and not (want("rank_sweep") or want("rank_flex") or want("rank_share")):
        return paths
    try:
        sweeps = load_sweeps(out)
    except FileNotFoundError:  # results made without rank sweeps
        return paths
    if sweeps["run"].str.fullmatch(r".+_r\d+").any():  # the rank-flexibility benchmark
        swept = set(sweeps[["adapter", "domain"]].itertuples(index=False, name=None))
        for adapter, domain in [pair for pair in (("stage1", "A"), ("final", "B")) if pair in swept]:
            if want(f"rank_flex_{adapter}_{domain}"):
                paths.append(save_figure(plot_rank_flex(out, adapter, domain),
                                         Path(image_dir) / f"rank_flex_{adapter}_{domain}.png"))
            if want(f"rank_share_{adapter}_{domain}"):
                paths.append(save_figure(plot_rank_share(out, adapter, domain),
                                         Path(image_dir) / f"rank_share_{adapter}_{domain}.png"))
        return paths
    for adapter, domain in sweeps[["adapter", "domain"]].drop_duplicates().itertuples(index=False):
        if want(f"rank_sweep_{adapter}_{domain}"):
            paths.append(save_figure(plot_rank_sweep(sweeps, adapter, domain),
                                     Path(image_dir) / f"rank_sweep_{adapter}_{domain}.png"))
    return paths
