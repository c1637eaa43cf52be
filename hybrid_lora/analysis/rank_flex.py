"""The rank-flexibility benchmark's table: one adapter cut to every rank against a LoRA trained
at that rank. No torch here; it reads result folders.

A results folder holds runs of the methods compared (each swept by cutting) and the per-rank
references `<reference>_r<k>` (`run --ranks lora=1,2,...`; the plain `<reference>` run is the
reference at its own rank r). For one adapter on one domain, per seed and rank k:

    kept_k  = (L_base - L_k) / (L_base - L_ref,k)      (loss; accuracy: the same with signs turned)

L_k the method's adapter cut to rank k (used whole from its own rank up), L_ref,k the reference
trained at rank k, L_base the base model, all on the same texts. AURAC is the area under kept_k
over log2 k from the smallest to the largest rank, divided by that width (trapezoids): 1.0 =
as good as a LoRA trained at every rank. The time ratio is the run's fastest epoch (training
steps without the evaluation, `train_seconds`) over that of the plain reference run of the same
seed; for a method whose epochs differ in work (`svd_nest`: lora_svd_nested nests only its last
steps) the sum over all epochs of both, valid for runs that trained alone and unpaused.
`d_aurac` is the paired comparison with the baseline that costs no extra training (the
reference cut by SVD): per seed, the run's AURAC minus that baseline's, so a method is better
only where this interval excludes zero. Every number is a mean with a t-interval over seeds.
A method swept over a lambda is reported at the lambda with the best mean AURAC on the
validation texts (domain `A_val` for the Stage-1 adapter, `B_val` for the final one): never
chosen on the reported texts.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

from ..methods import get_method
from ..results import epoch_seconds, read_json
from .stats import paired_t_interval
from .sweep_results import load_sweeps

_LAMBDA = re.compile(r"(.+)_lam[0-9.e+-]+$")


def _rank_of(run: str, reference: str) -> int | None:
    match = re.fullmatch(re.escape(reference) + r"_r(\d+)", run)
    return int(match[1]) if match else None


def aurac(kept: dict[int, float]) -> float:
    """Area under {rank: kept share} over log2(rank), divided by the width; NaN if any is NaN."""
    ranks = sorted(kept)
    if len(ranks) < 2 or any(math.isnan(kept[k]) for k in ranks):
        return math.nan
    xs = [math.log2(k) for k in ranks]
    area = sum((xs[i + 1] - xs[i]) * (kept[ranks[i]] + kept[ranks[i + 1]]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def _time_ratio(run: tuple[str, list[float]], reference: tuple[str, list[float]]) -> float:
    """Training time of `run` over `reference`, each (method, epoch seconds): fastest epoch over
    fastest epoch, or all epochs over all epochs for a method whose epochs differ in work."""
    (method, times), (_, ref_times) = run, reference
    if get_method(method).svd_nest:
        return sum(times) / sum(ref_times)
    return min(times) / min(ref_times)


def _warn_unfinished(refs: dict, ranks: list[int], reference: str, adapter: str, domain: str) -> None:
    """Warn for each seed that lacks some reference's own-rank slice row: it is left out."""
    for seed in sorted(refs):
        missing = sorted(set(ranks) - set(refs[seed]))
        if missing:
            warnings.warn(
                f"seed {seed} left out of the rank-flexibility comparison on {adapter} {domain}: no slice row at "
                f"its own rank for the reference(s) at rank {missing} ({reference!r} or {reference}_r<k>). "
                f"If those runs have finished, sweep them: sweep-ranks --run <run>/seed{seed} "
                f"--ranks <its rank> --kinds slice", stacklevel=3)


def per_seed_shares(sweeps, adapter: str, domain: str, reference: str = "lora", key: str = "loss"):
    """{(run, kind, scaling): {seed: {rank: kept share}}} against the per-rank references, and
    {seed: {rank: reference value}}; ranks are those of the references, and only seeds whose
    references are all finished count (a grid still running gives no half-compared seed; a seed
    with some references swept but not all is named in a warning)."""
    at = sweeps[(sweeps["adapter"] == adapter) & (sweeps["domain"] == domain)]
    own = at[at["rank"] == at["adapter_rank"]]
    refs = {}
    for row in own.itertuples():
        k = row.adapter_rank if row.run == reference else _rank_of(row.run, reference)
        if k is not None and row.kind == "slice":
            refs.setdefault(row.seed, {})[int(k)] = (getattr(row, key), row.base_loss if key == "loss" else row.base_acc)
    if not refs:
        raise ValueError(f"no reference runs {reference!r} / {reference}_r<k> swept on {adapter} {domain}")
    ranks = sorted(set.union(*(set(r) for r in refs.values())))
    _warn_unfinished(refs, ranks, reference, adapter, domain)
    refs = {seed: r for seed, r in refs.items() if set(r) == set(ranks)}  # seeds with every reference
    sign = 1.0 if key == "loss" else -1.0
    shares = {}
    for (run, kind, scaling), g in at.groupby(["run", "kind", "scaling"], sort=False):
        if _rank_of(run, reference) is not None:
            continue
        for seed, s in g.groupby("seed"):
            if seed not in refs:
                continue
            values = dict(zip(s["rank"].astype(int), s[key]))
            own_rank, base = int(s["adapter_rank"].iloc[0]), s[f"base_{key}"].iloc[0]
            row = {}
            for k in ranks:
                v = values.get(k) if k < own_rank else values.get(own_rank)
                ref, ref_base = refs[seed][k]
                gain = sign * (base - ref)
                row[k] = math.nan if v is None or gain == 0 else sign * (base - v) / gain
            shares.setdefault((run, kind, scaling), {})[seed] = row
    ref_values = {seed: {k: refs[seed][k][0] for k in ranks} for seed in refs}
    return shares, ref_values


def reference_points(sweeps, adapter: str, domain: str, reference: str = "lora", level: float = 0.95):
    """DataFrame (metric, rank, mean, lo, hi): the reference trained at each rank, loss and
    accuracy of its uncut adapter, t-intervals over seeds."""
    import pandas as pd

    at = sweeps[(sweeps["adapter"] == adapter) & (sweeps["domain"] == domain) & (sweeps["kind"] == "slice")
                & (sweeps["rank"] == sweeps["adapter_rank"])]
    at = at[(at["run"] == reference) | at["run"].str.fullmatch(re.escape(reference) + r"_r\d+")]
    rows = []
    for metric in ("loss", "acc"):
        for k, g in at.groupby("adapter_rank"):
            mean, lo, hi = paired_t_interval(list(g[metric]), level)
            rows.append({"metric": metric, "rank": int(k), "mean": mean, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


def choose_lambdas(sweeps, adapter: str, val_domain: str, reference: str = "lora") -> dict[str, str]:
    """{method family: run name}: among a method's lambda runs (`<m>` and `<m>_lam<v>`), the one
    with the best mean validation AURAC (loss, slice); runs without lambda variants map to themselves."""
    shares, _ = per_seed_shares(sweeps, adapter, val_domain, reference)
    best = {}
    for (run, kind, _), per_seed in shares.items():
        if kind != "slice":
            continue
        family = _LAMBDA.fullmatch(run)[1] if _LAMBDA.fullmatch(run) else run
        score = sum(aurac(v) for v in per_seed.values()) / len(per_seed)
        if family not in best or score > best[family][1]:
            best[family] = (run, score)
    return {family: run for family, (run, _) in best.items()}


def rank_flex_benchmark(out: str | Path, adapter: str = "stage1", domain: str = "A",
                        reference: str = "lora", level: float = 0.95, versus: str = "svd"):
    """One row per compared (run, kind, scaling) of `adapter` on `domain`: kept share of the
    per-rank reference's gain in loss at every reference rank and AURAC in loss and accuracy
    (mean and t-interval over seeds), `d_aurac`: AURAC minus that of the reference cut by
    `versus`, paired by seed (NaN where that cut was not swept), the time ratio to the reference
    run, and `chosen`:
    whether the run is its method's lambda chosen on the validation texts (runs of other
    lambdas are listed with chosen False). Then one row for the reference itself: its loss
    per rank (`loss_<k>`)."""
    import pandas as pd

    sweeps = load_sweeps(out)
    shares, ref_loss = per_seed_shares(sweeps, adapter, domain, reference)
    acc_shares, _ = per_seed_shares(sweeps, adapter, domain, reference, key="acc")
    val_domain = f"{domain}_val"
    chosen = (choose_lambdas(sweeps, adapter, val_domain, reference)
              if val_domain in set(sweeps["domain"]) else {})
    seconds = epoch_seconds(out)
    ranks = sorted(next(iter(ref_loss.values())))
    baseline = next((v for (run, kind, _), v in shares.items() if (run, kind) == (reference, versus)), {})
    rows = []
    for (run, kind, scaling), per_seed in shares.items():
        family = _LAMBDA.fullmatch(run)[1] if _LAMBDA.fullmatch(run) else run
        row = {"run": run, "kind": kind, "scaling": scaling, "n_seeds": len(per_seed),
               "chosen": chosen.get(family, run) == run}
        for k in ranks:
            row[f"kept_{k}"], row[f"kept_{k}_lo"], row[f"kept_{k}_hi"] = \
                paired_t_interval([v[k] for v in per_seed.values()], level)
        row["aurac"], row["aurac_lo"], row["aurac_hi"] = \
            paired_t_interval([aurac(v) for v in per_seed.values()], level)
        row["d_aurac"], row["d_aurac_lo"], row["d_aurac_hi"] = paired_t_interval(
            [aurac(v) - aurac(baseline[s]) for s, v in per_seed.items() if s in baseline], level)
        acc = acc_shares.get((run, kind, scaling), {})
        row["aurac_acc"], row["aurac_acc_lo"], row["aurac_acc_hi"] = \
            paired_t_interval([aurac(v) for v in acc.values()], level)
        ratios = [_time_ratio(seconds[run, s], seconds[reference, s]) for s in per_seed
                  if (run, s) in seconds and (reference, s) in seconds]
        row["time"], row["time_lo"], row["time_hi"] = paired_t_interval(ratios, level)
        rows.append(row)
    ref_row = {"run": f"{reference}_r<k>", "kind": "trained", "scaling": "", "n_seeds": len(ref_loss),
               "chosen": True}
    for k in ranks:
        vals = [v[k] for v in ref_loss.values()]
        ref_row[f"loss_{k}"] = sum(vals) / len(vals)
    table = pd.DataFrame(rows)
    return table, pd.DataFrame([ref_row])


def rank_flex_markdown_spec(table) -> tuple:
    """The `markdown.markdown_table` spec of a `rank_flex_benchmark` table."""
    ranks = [c[len("kept_"):] for c in table.columns if c.startswith("kept_") and c.count("_") == 1]
    return (("run", "run", "s"), ("cut", "kind", "s"), ("n", "n_seeds", "d"),
            *((f"kept at {k}", (f"kept_{k}", f"kept_{k}_lo", f"kept_{k}_hi"), ".2f") for k in ranks),
            ("AURAC (loss)", ("aurac", "aurac_lo", "aurac_hi"), ".3f"),
            ("AURAC (acc)", ("aurac_acc", "aurac_acc_lo", "aurac_acc_hi"), ".3f"),
            ("AURAC - LoRA SVD, paired", ("d_aurac", "d_aurac_lo", "d_aurac_hi"), "+.3f"),
            ("time / LoRA", ("time", "time_lo", "time_hi"), ".2f"))
