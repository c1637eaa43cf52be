"""Cutting a trained adapter to lower ranks without training: slicing under an explicit scaling
convention, SVD truncation of each module's delta W, and the post-hoc rank sweep.

Scaling conventions when the first k of r components are kept (alpha = the adapter's lora_alpha):
- "preserve": every kept component contributes as before (scaling stays alpha/r).
- "dylora":   scaling becomes alpha/k, as in DyLoRA's training and PEFT's default for a rank-k
              adapter with the same lora_alpha (kept components grow by r/k).
SVD truncation replaces each module's B A by its best rank-k approximation (Eckart-Young),
scaling unchanged, so scaling * B' A' is the best rank-k approximation of delta W.
SVD allocation ("svd_alloc", post-hoc allocation across modules) spends the parameters of
uniform rank k, sum over modules of k (in + out), on the singular components of every module's
delta W chosen by one global threshold on the singular values of scaling * B A (best first, kept
while they fit: `allocation.mask_to_budget`); each module keeps its largest ones.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .adapters import (ADAPTER, component_mask, load_adapter, lora_factors, rebuild_model_for_new_rank,
                       snapshot_factors)
from .allocation import mask_to_budget
from .config import REBUILD_CUTS
from .evaluate import evaluate_loss_and_token_acc
from .results import read_json, write_json_atomic

SCALINGS = ("preserve", "dylora")


def slice_multiplier(model: nn.Module, k: int, scaling: str) -> float:
    """Factor on each of the first k components that gives rank k under `scaling`."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}: must be one of {SCALINGS}")
    if scaling == "preserve":
        return 1.0
    alpha = model.peft_config[ADAPTER].lora_alpha
    current = lora_factors(model)[0][3]  # alpha_saved / r: uniform over modules
    return alpha / k / current


def lora_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B A (B [out, r], A [r, in]) without forming it: (U [out, r], S [r], Vh [r, in]).

    B = Qb Rb and A^T = Qa Ra (reduced QR), so B A = Qb (Rb Ra^T) Qa^T and only the r x r
    middle matrix is decomposed. Computed in float64, returned in A's dtype.
    """
    qb, rb = torch.linalg.qr(b.double())        # [out, r], [r, r]
    qa, ra = torch.linalg.qr(a.double().T)      # [in, r], [r, r]
    um, s, vmh = torch.linalg.svd(rb @ ra.T)    # [r, r], [r], [r, r]
    return (qb @ um).to(a.dtype), s.to(a.dtype), (vmh @ qa.T).to(a.dtype)


def svd_truncate_factors(a: torch.Tensor, b: torch.Tensor, k: int, svd=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [r, in], B' [out, r]) with B' A' the best rank-k approximation of B A; components
    k.. are zero, so they fit the same module. Singular values are split evenly (sqrt S).
    `svd`: `lora_svd(a, b)` if already computed (a sweep cuts one adapter at many ranks)."""
    r = a.shape[0]
    if not 1 <= k <= r:
        raise ValueError(f"k={k}: must be between 1 and the adapter's rank {r}")
    u, s, vh = svd if svd is not None else lora_svd(a, b)
    root = s[:k].sqrt()
    a_new, b_new = torch.zeros_like(a), torch.zeros_like(b)
    a_new[:k] = root[:, None] * vh[:k]   # [k, in]
    b_new[:, :k] = u[:, :k] * root       # [out, k]
    return a_new, b_new


def svd_allocate(factors, scalings, k: int, svds=None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """(factors cut by one global singular-value threshold to the parameters of uniform rank k,
    kept ranks per module). `factors` [(A [r, in], B [out, r])]; `svds` as `lora_svd` gives."""
    svds = svds if svds is not None else [lora_svd(a, b) for a, b in factors]
    scores = [s * sv for s, (_, sv, _) in zip(scalings, svds)]  # singular values of delta W
    costs = [a.shape[1] + b.shape[0] for a, b in factors]
    kept = [int(m.sum()) for m in mask_to_budget(scores, costs, k * sum(costs))]
    cut = []
    for (a, b), svd, n in zip(factors, svds, kept):  # the kept ones are each module's largest
        cut.append(svd_truncate_factors(a, b, n, svd) if n else (torch.zeros_like(a), torch.zeros_like(b)))
    return cut, kept


def cut_factors(factors, scalings, k: int, kind: str, multiplier: float = 1.0, svds=None) -> list:
    """[(A, B)] of an adapter cut to rank k, each at its full shape (components past the cut
    zero): "slice" keeps the first k components with B scaled by `multiplier`
    (`slice_multiplier`), "svd" each module's best rank k, "svd_alloc" the parameters of rank k
    spread over modules by singular value. `svds`: `lora_svd` of each module, if computed."""
    if kind not in ("slice", "svd", "svd_alloc"):
        raise ValueError(f"kind={kind!r}: must be 'slice', 'svd' or 'svd_alloc'")
    if kind == "slice":
        cut = []
        for a, b in factors:
            a_new, b_new = torch.zeros_like(a), torch.zeros_like(b)
            a_new[:k], b_new[:, :k] = a[:k], b[:, :k] * multiplier
            cut.append((a_new, b_new))
        return cut
    svds = svds if svds is not None else [lora_svd(a, b) for a, b in factors]
    if kind == "svd":
        return [svd_truncate_factors(a, b, k, svd) for (a, b), svd in zip(factors, svds)]
    return svd_allocate(factors, scalings, k, svds)[0]


def rotate_to_svd(model: nn.Module, a_scale: bool = False) -> None:
    """Rewrite every module's LoRA factors, in place, as its SVD basis: A = sqrt(S) Vh, B = U sqrt(S)
    with the singular values in falling order, so B A (the function) is unchanged up to float
    rounding and component i is the i-th singular direction (a slice to k is the SVD cut to k).
    `a_scale`: A's rows stay at the RMS row norm c of the module's old A instead, A = c Vh,
    B = U S / c (LoRA's scale, about 0.58 from its random init, where sqrt(S) is far smaller)."""
    with torch.no_grad():
        for _, a, b, _ in lora_factors(model):
            u, s, vh = lora_svd(a.detach(), b.detach())
            if a_scale:  # (no division by a singular value: a zero one, e.g. of B = 0, stays 0)
                c = a.detach().double().square().sum(1).mean().sqrt().clamp(min=1e-12).to(a.dtype)
                a_row, b_col = c.expand_as(s), s / c
            else:
                a_row = b_col = s.sqrt()
            a.copy_(a_row[:, None] * vh)
            b.copy_(u * b_col)


def cut_model_to_rank(model: nn.Module, new_r: int, cut: str = "slice", scaling: str = "preserve") -> nn.Module:
    """`model` cut in place to rank `new_r` for further training (a rank schedule's step).
    cut="slice": the first `new_r` components; "svd": each module's best rank-`new_r`
    approximation of B A (rotated into its SVD basis, then sliced); "svd_a_scale": the same
    approximation with A's rows at the old A's RMS norm (`rotate_to_svd(a_scale=True)`).
    `scaling` as in `adapters.rebuild_model_for_new_rank`; the caller builds a new optimizer."""
    if cut not in REBUILD_CUTS:
        raise ValueError(f"cut={cut!r}: must be one of {REBUILD_CUTS}")
    if cut != "slice":
        rotate_to_svd(model, a_scale=cut == "svd_a_scale")
    return rebuild_model_for_new_rank(model, new_r, scaling=scaling)


@contextmanager
def swapped_factors(model: nn.Module, factors: list[tuple[torch.Tensor, torch.Tensor]]):
    """Inside the block the model's LoRA A and B hold `factors`; the originals come back after."""
    saved = snapshot_factors(model)
    live = [(a, b) for _, a, b, _ in lora_factors(model)]
    try:
        with torch.no_grad():
            for (a, b), (a_new, b_new) in zip(live, factors):
                a.copy_(a_new)
                b.copy_(b_new)
        yield model
    finally:
        with torch.no_grad():
            for (a, b), (a_old, b_old) in zip(live, saved):
                a.copy_(a_old)
                b.copy_(b_old)


def rank_sweep(model: nn.Module, loader, ranks, kind: str = "slice", scaling: str = "preserve",
               amp_dtype: torch.dtype | None = None, progress=None) -> list[dict]:
    """Evaluate one adapter cut to each rank in `ranks` (those above its rank are skipped),
    no training. kind="slice": first k components under `scaling`; kind="svd": best rank-k
    approximation of each module's delta W; kind="svd_alloc": the parameters of rank k spread
    over modules by singular value (`svd_allocate`). Returns [{"rank", "loss", "acc"}]."""
    if kind not in ("slice", "svd", "svd_alloc"):
        raise ValueError(f"kind={kind!r}: must be 'slice', 'svd' or 'svd_alloc'")
    factors = [(a.detach(), b.detach()) for _, a, b, _ in lora_factors(model)]
    scalings = [s for *_, s in lora_factors(model)]
    r = factors[0][0].shape[0]
    ranks = sorted(k for k in set(ranks) if k <= r)
    svds = [lora_svd(a, b) for a, b in factors] if kind != "slice" else None  # once, cut at each k
    points = []
    for k in ranks:
        if kind == "slice":
            with component_mask(model) as m:
                m[k:] = 0.0
                m[:k] = slice_multiplier(model, k, scaling)
                ev = evaluate_loss_and_token_acc(model, loader, amp_dtype)
        else:
            with swapped_factors(model, cut_factors(factors, scalings, k, kind, svds=svds)):
                ev = evaluate_loss_and_token_acc(model, loader, amp_dtype)
        points.append({"rank": k, "loss": ev["loss"], "acc": ev["acc"]})
        if progress is not None:
            progress.update()
    return points


def sweep_adapters(adapters: dict, loaders: dict, ranks, kinds, amp_dtype=None,
                   progress: bool = True, uncut: dict | None = None) -> list[dict]:
    """Rank sweeps of several adapters on several domains, as flat rows for `sweep.json`.

    adapters: {"stage1": model, "final": model}; loaders: {"A": eval loader, "B": ...};
    kinds: [("slice", "preserve"), ("svd", "preserve"), ...]. Each row: adapter,
    adapter_rank, domain, kind, scaling, rank, loss, acc. Every adapter also gets a row at
    its own rank, listed in `ranks` or not: the reference the shares of its gain are of.
    `uncut` ({(adapter, domain): {"loss", "acc"}}, the uncut adapter on those sequences, known
    from the R matrix) gives those rows without evaluating them again (a cut to its own rank
    is the adapter itself: SVD only rotates its factors).
    """
    from tqdm.auto import tqdm

    uncut = uncut or {}
    jobs = [(name, model, domain, loader, kind, scaling)
            for name, model in adapters.items() for domain, loader in loaders.items()
            for kind, scaling in kinds]

    def todo(name, model, domain):
        r = lora_factors(model)[0][1].shape[0]
        return sorted({k for k in ranks if k < r} | ({r} if (name, domain) not in uncut else set()))

    total = sum(len(todo(name, model, domain)) for name, model, domain, *_ in jobs)
    bar = tqdm(total=total, desc="rank sweep", unit="eval", disable=not progress)
    rows = []
    for name, model, domain, loader, kind, scaling in jobs:
        r = lora_factors(model)[0][1].shape[0]
        points = rank_sweep(model, loader, todo(name, model, domain), kind, scaling, amp_dtype, progress=bar)
        if (name, domain) in uncut:
            points.append({"rank": r, **uncut[name, domain]})
        for point in points:
            rows.append({"adapter": name, "adapter_rank": r, "domain": domain, "kind": kind,
                         "scaling": scaling, **point})
    bar.close()
    return rows


# sweep domain -> (matrix of eval_sequences.json, column): the evaluation and validation texts
SWEPT = {"A": ("R", 0), "B": ("R", 1), "A_val": ("R_val", 0), "B_val": ("R_val", 1)}


def _first(entry: dict, n: int | None) -> dict:
    """{"loss", "acc"} of the first `n` sequences (all if None) of an R-matrix entry's
    per-sequence sums ({"nll", "tokens", "hits"} lists, eval_sequences.json)."""
    nll, tokens, hits = (entry[k][:n] for k in ("nll", "tokens", "hits"))
    return {"loss": sum(nll) / sum(tokens), "acc": sum(hits) / sum(tokens)}


def sweep_run(run, cfg, loaders: dict, ranks, kinds, device, amp_dtype=None,
              progress: bool = True) -> list[dict]:
    """Sweep the saved adapters of one run folder (`adapter_stage1/`, `adapter_final/`, those
    present; a one-domain run's `adapter_final/` as "stage1") on `loaders` ({"A": eval loader of domain 1, "B": of domain 2, and optionally
    "A_val", "B_val": their validation loaders}), cut to the first
    `cfg.sweep_n_eval` sequences (None: all); merge the rows into `<run>/sweep.json` (a row with
    the same adapter, domain, kind, scaling and rank is replaced) and return all its rows.

    With the run's `eval_sequences.json` (per-sequence sums of the R matrix), every row also
    holds `n_eval` and the base model on the same sequences (`base_loss`, `base_acc`), and the
    rows at an adapter's own rank are read from R instead of evaluated again."""
    from pathlib import Path

    from torch.utils.data import Subset

    from .data import eval_loader
    from .results import SEQUENCES_FILE

    run = Path(run)
    # a one-domain run's only adapter (adapter_final) is its Stage-1 adapter: swept as "stage1"
    folders = {"stage1": "adapter_final"} if len(cfg.domains) == 1 else {n: f"adapter_{n}" for n in ("stage1", "final")}
    adapters = {name: load_adapter(cfg, run / folder, device)
                for name, folder in folders.items() if (run / folder).exists()}
    if not adapters:
        raise FileNotFoundError(f"no adapter_stage1/ or adapter_final/ in {run}")
    n = cfg.sweep_n_eval
    if n is not None:
        loaders = {d: eval_loader(cfg, Subset(ld.dataset, range(min(n, len(ld.dataset)))))
                   for d, ld in loaders.items()}
    seqs = read_json(run / SEQUENCES_FILE) if (run / SEQUENCES_FILE).exists() else None
    if seqs is None and n is not None:
        raise FileNotFoundError(f"sweep_n_eval={n} needs the base model on those sequences, from "
                                f"{run / SEQUENCES_FILE}, written when the run completes")
    uncut, extra = {}, {}
    if seqs is not None:
        for d in loaders:
            matrix, col = SWEPT[d]
            if matrix not in seqs:
                raise ValueError(f"{run / SEQUENCES_FILE} has no {matrix}: cannot sweep domain {d!r}")
            r = seqs[matrix]
            base = _first(r[0][col], n)
            extra[d] = {"n_eval": len(loaders[d].dataset), "base_loss": base["loss"], "base_acc": base["acc"]}
            for name in adapters:  # stage1: after stage 1; final: after the last stage
                uncut[name, d] = _first(r[1 if name == "stage1" else -1][col], n)
    new = [{**row, **extra.get(row["domain"], {})}
           for row in sweep_adapters(adapters, loaders, ranks, kinds, amp_dtype, progress, uncut)]
    key = lambda row: tuple(row[k] for k in ("adapter", "domain", "kind", "scaling", "rank"))  # noqa: E731
    old = read_json(run / "sweep.json") if (run / "sweep.json").exists() else []
    fresh = {key(row) for row in new}
    rows = [row for row in old if key(row) not in fresh] + new
    write_json_atomic(run / "sweep.json", rows)
    return rows
