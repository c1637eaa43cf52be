"""Rank chosen per input at evaluation (Dynamic LoRA's input-driven rank), for a nested adapter
(`matryoshka`, `dylora_nested`) whose every prefix works.

Feature: the variance of the first adapted module's input over the sequence's attended
positions (mean over features), computed inside the same forward pass before any LoRA module
acts. Policy for a target average rank a with trained levels k_lo < a < k_hi adjacent in K
(1, 2, 4, ... up to r): the share p = (a - k_lo) / (k_hi - k_lo) of sequences with the highest
feature get rank k_hi, the others k_lo, a monotone map whose threshold is the (1 - p) quantile
of the feature on held-out training texts of the same domain (its validation texts), so the
average rank given on each domain is close to a and the comparison with a fixed cut is matched.
Controls at the same average: "random" (the same two ranks, k_hi with probability p, a seeded
draw per sequence) and "fixed" (every sequence cut to rank a). Every cut keeps the first k
components under the method's scaling (`Method.cut_scaling`).

One batched forward pass serves sequences of different ranks: every LoRA module's A output
[B, T, r] is multiplied by a per-row [B, 1, r] multiplier chosen at the first module.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .adapters import ADAPTER, current_rank, load_adapter, load_tokenizer, lora_layers
from .config import ExperimentConfig
from .data import make_loaders
from .evaluate import evaluate_loss_and_token_acc
from .ranks import slice_multiplier
from .results import PER_INPUT_FILE, read_json, write_json_atomic

PER_INPUT_SCHEMA = 1
POLICIES = ("feature", "random", "fixed")


def row_variance(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B] per sequence of x [B, T, d]: the variance over its attended positions, mean over d."""
    x = x.detach().float()
    m = torch.ones(x.shape[:2], device=x.device) if attention_mask is None else attention_mask.float()
    m = m[..., None]                                          # [B, T, 1]
    n = m.sum(1).clamp(min=1)                                 # [B, 1]
    mean = (x * m).sum(1) / n                                 # [B, d]
    return (((x - mean[:, None]) ** 2) * m).sum(1).div(n).mean(-1)


class PerRowRank:
    """Hooks giving each sequence of a batch its own rank. `choose(feature [B]) -> ranks [B]`
    (integers in 1..r) is called at the first LoRA module; `scaling` as in `ranks.slice_multiplier`.
    Keeps every feature seen (`features`) and the ranks given (`ranks`), in loader order."""

    def __init__(self, model, choose, scaling: str):
        self.choose, self.features, self.ranks = choose, [], []
        layers = lora_layers(model)
        r = current_rank(model)
        device = layers[0][1].lora_A[ADAPTER].weight.device
        j = torch.arange(r)
        table = [torch.where(j < k, slice_multiplier(model, k, scaling), 0.0) for k in range(1, r + 1)]
        self.table = torch.stack(table).to(device)            # [r, r]: row k-1 = rank k's multipliers
        self.mask, self.rows = None, None
        self.hooks = [model.register_forward_pre_hook(self._batch, with_kwargs=True),
                      layers[0][1].register_forward_pre_hook(self._first)]
        self.hooks += [mod.lora_A[ADAPTER].register_forward_hook(lambda _m, _i, out: out * self.rows)
                       for _, mod in layers]

    def _batch(self, _module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def _first(self, _module, args):
        feature = row_variance(args[0], self.mask)            # [B]
        ranks = self.choose(feature).to(self.table.device)    # [B]
        self.features.append(feature.cpu()), self.ranks.append(ranks.cpu())
        self.rows = self.table[ranks - 1][:, None, :]         # [B, 1, r]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def evaluate_per_row(model, loader, choose, scaling: str, amp_dtype=None) -> dict:
    """`evaluate_loss_and_token_acc` with each sequence at the rank `choose` gives it; adds
    "avg_rank" (the mean rank given) and "features" (a list, loader order)."""
    hooks = PerRowRank(model, choose, scaling)
    try:
        out = evaluate_loss_and_token_acc(model, loader, amp_dtype)
    finally:
        hooks.close()
    return {**out, "avg_rank": torch.cat(hooks.ranks).double().mean().item(),
            "features": torch.cat(hooks.features).tolist()}


def levels_around(avg: float, r: int) -> tuple[int, int]:
    """(k_lo, k_hi): the adjacent powers of two (r the top level) with k_lo < avg < k_hi."""
    levels = sorted({2**j for j in range(r.bit_length()) if 2**j <= r} | {r})
    for lo, hi in zip(levels, levels[1:]):
        if lo < avg < hi:
            return lo, hi
    raise ValueError(f"average rank {avg}: must lie strictly between two of the levels {levels}")


def policy(kind: str, avg: float, r: int, calibration: torch.Tensor, seed: int = 0):
    """(choose function, its description) of policy `kind` at average rank `avg`;
    `calibration`: the feature of each held-out training sequence."""
    if kind == "fixed":
        if avg != int(avg):
            raise ValueError(f"a fixed cut needs an integer rank, not {avg}")
        return (lambda f: torch.full(f.shape, int(avg), dtype=torch.long)), {"k_lo": int(avg), "k_hi": int(avg)}
    lo, hi = levels_around(avg, r)
    p = (avg - lo) / (hi - lo)
    if kind == "feature":
        threshold = torch.quantile(calibration.double(), 1 - p).item()
        return (lambda f: torch.where(f.cpu().double() > threshold, hi, lo)), \
            {"k_lo": lo, "k_hi": hi, "share_hi": p, "threshold": threshold}
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return (lambda f: torch.where(torch.rand(len(f), generator=g) < p, hi, lo)), \
            {"k_lo": lo, "k_hi": hi, "share_hi": p}
    raise ValueError(f"policy {kind!r}: must be one of {POLICIES}")


def default_averages(r: int) -> list[int]:
    """The integer averages half-way between adjacent levels: 3, 6, 12, ... below r."""
    return [3 * 2**j for j in range(r.bit_length()) if 3 * 2**j < r]


def per_input_run(run: str | Path, averages=None, device: str = "cpu", progress: bool = True) -> dict:
    """Rank per input on a finished nested run's final adapter, on each domain's evaluation
    texts, for every policy and average rank (`default_averages` by default); calibrated on
    that domain's validation texts. Writes and returns `<run>/per_input.json`."""
    from tqdm.auto import tqdm

    from .methods import get_method

    run = Path(run)
    saved = read_json(run / "config.json")
    cfg, method = ExperimentConfig.from_dict(saved), get_method(saved["method"])
    if not method.nested:
        raise ValueError(f"{run}: method {saved['method']!r} is not nested; per-input rank needs an "
                         "adapter whose every prefix works (matryoshka, dylora_nested)")
    if not cfg.n_val:
        raise ValueError(f"{run}: the run has no validation texts (n_val=0) to calibrate on")
    tok = load_tokenizer(cfg)
    loaders = [make_loaders(cfg, tok, d, saved["seed"]) for d in cfg.domains]
    model = load_adapter(cfg, run / "adapter_final", device)
    r, scaling = current_rank(model), method.cut_scaling(cfg)
    full = lambda f: torch.full(f.shape, r, dtype=torch.long)  # noqa: E731
    calibration = {d: torch.tensor(evaluate_per_row(model, ld.val, full, scaling)["features"])
                   for d, ld in zip(cfg.domains, loaders)}
    averages = list(averages or default_averages(r))
    rows = []
    jobs = [(d, ld, kind, a) for d, ld in zip(cfg.domains, loaders) for a in averages for kind in POLICIES]
    for domain, ld, kind, avg in tqdm(jobs, desc="per-input rank", disable=not progress):
        choose, info = policy(kind, avg, r, calibration[domain])
        ev = evaluate_per_row(model, ld.eval, choose, scaling)
        rows.append({"domain": domain, "policy": kind, "target_avg": avg, "avg_rank": ev["avg_rank"],
                     "loss": ev["loss"], "acc": ev["acc"], **info})
    out = {"schema_version": PER_INPUT_SCHEMA, "adapter": "final", "r": r, "scaling": scaling,
           "n_calibration": {d: len(c) for d, c in calibration.items()}, "rows": rows}
    write_json_atomic(run / PER_INPUT_FILE, out)
    return out
