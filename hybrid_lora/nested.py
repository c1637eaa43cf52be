"""Rank-nested training: every prefix of the adapter is trained to work on its own.

DyLoRA (the DyLoRA paper's Algorithm 1; methods `*_nested`, `NestedStep`): each optimizer step
samples one rank b ~ p_B on [dylora_r_min, r] for the whole model. The forward pass uses every
module's first b components at scaling alpha/b (through `component_mask`), and the step updates
components 1..b, or only component b when `dylora_frozen`. Adam's momentum and weight decay
would still move components outside that set, so they are put back after the step: they are
left exactly as they were.

Matryoshka weighting (methods `*matryoshka`, `MatryoshkaStep`; after MatryoshkaLoRA): each step
trains the mean of the rank-k sub-adapters, k in K = `matryoshka_ranks(cfg, r)`, where the
rank-k sub-adapter is the first k components at alpha/k (the scaling a cut to rank k keeps,
`cut_scaling` "dylora"). That mean is one LoRA with a fixed diagonal between A and B: component
i (0-based) weighted by (1/|K|) sum_{k in K, k > i} alpha/k, so one forward pass at the cost of
one LoRA step gives every prefix a gradient at every step. `matryoshka_weighting="sum"` trains
the sum of the sub-adapters at the adapter's own scaling instead (component i weighted by the
number of k in K above i), as MatryoshkaLoRA's reference code does by default; its cuts then keep
the scaling ("preserve").
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .adapters import component_mask, current_rank, lora_factors
from .config import ExperimentConfig
from .distributed import broadcast
from .ranks import slice_multiplier


def rank_distribution(cfg: ExperimentConfig, r: int) -> torch.Tensor:
    """p_B over b = 1..r as a CPU tensor [r]: zero below dylora_r_min; uniform, or geometric
    p (1 - p)^(b - r_min) renormalised to the range."""
    b = torch.arange(1, r + 1, dtype=torch.float64)
    inside = b >= cfg.dylora_r_min
    if cfg.dylora_distribution == "uniform":
        w = inside.double()
    elif cfg.dylora_distribution == "ranks":  # the ranks the sweep evaluates, and r
        ranks = torch.tensor(sorted({k for k in cfg.sweep_ranks if k <= r} | {r}), dtype=torch.float64)
        w = (inside & torch.isin(b, ranks)).double()  # r >= dylora_r_min (validated): never all zero
    else:
        w = torch.where(inside, cfg.dylora_p * (1 - cfg.dylora_p) ** (b - cfg.dylora_r_min), 0.0)
    return w / w.sum()


class NestedStep:
    """Per-step rank sampling, truncated forward and masked update for one model (one rank);
    the rank-b forward at the cut `scaling` ("dylora": alpha/b, DyLoRA's; "preserve": the
    adapter's own alpha/r, an SVD cut's)."""

    def __init__(self, model, cfg: ExperimentConfig, mask: torch.Tensor, scaling: str = "dylora"):
        r = current_rank(model)
        self.mask = mask
        self.probs = rank_distribution(cfg, r)
        device = mask.device
        ks = torch.arange(1, r + 1)
        j = torch.arange(r)
        # forward[b - 1] = the component factors of rank b; update[b - 1] = what steps
        mult = torch.tensor([slice_multiplier(model, int(k), scaling) for k in ks])  # over the model's alpha/r
        self.forward = torch.where(j[None, :] < ks[:, None], mult[:, None], 0.0).to(device)  # [r, r]
        upd = (j[None, :] == ks[:, None] - 1) if cfg.dylora_frozen else (j[None, :] < ks[:, None])
        self.update = upd.to(device)                                                         # [r, r]
        self.keep = torch.ones(r, dtype=torch.bool, device=device)
        factors = [(a, b) for _, a, b, _ in lora_factors(model)]
        self.params = [p for ab in factors for p in ab]
        self.live = [p.detach() for p in self.params]  # views: always the current values
        self.masks = [m for _ in factors for m in (self.keep[:, None], self.keep[None, :])]  # A rows, B cols
        self.before = [p.detach().clone() for p in self.params]
        self.hooks = []
        if cfg.dylora_frozen:  # only component b may receive a gradient
            self.hooks = [p.register_hook(lambda g, m=m: g * m) for p, m in zip(self.params, self.masks)]

    def sample(self) -> int:
        """Draw b from the global CPU RNG (saved in checkpoints, so a resumed run draws the same)."""
        return int(torch.multinomial(self.probs, 1)) + 1

    def next_rank(self) -> int:
        """This step's b: process 0's draw on every process (all must train the same rank)."""
        return broadcast(self.sample())

    def begin(self, b: int) -> None:
        """Before the forward pass: truncate to rank b; remember the weights."""
        self.mask.copy_(self.forward[b - 1])
        self.keep.copy_(self.update[b - 1])
        torch._foreach_copy_(self.before, self.live)

    @torch.no_grad()
    def end(self) -> None:
        """After the optimizer step: components outside the update set get their old values."""
        for p, old, m in zip(self.params, self.before, self.masks):
            torch.where(m, p, old, out=p)

    def full(self) -> None:
        """All components at the model's own scaling (for evaluation)."""
        self.mask.fill_(1.0)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def matryoshka_ranks(cfg: ExperimentConfig, r: int) -> list[int]:
    """The sub-adapter ranks K of a rank-r adapter: `cfg.matryoshka_ranks` (default 1, 2, 4, ...)
    that are <= r, always with r itself."""
    ks = cfg.matryoshka_ranks or tuple(2**j for j in range(r.bit_length()))
    return sorted({k for k in ks if k <= r} | {r})


def matryoshka_weights(cfg: ExperimentConfig, r: int, alpha: float, scaling: str = "dylora") -> torch.Tensor:
    """[r] multipliers on the components of a rank-r adapter at PEFT's scaling alpha/r that make
    it the mean (`matryoshka_weighting="sum"`: the sum) of the rank-k sub-adapters, k in K: the
    first k components at the scaling a cut to rank k gives, alpha/k under `scaling` "dylora",
    the adapter's own alpha/r under "preserve". Sum and "preserve" is MatryoshkaLoRA's reference
    default (component i weighted by the number of k in K above i)."""
    ks = matryoshka_ranks(cfg, r)
    i = torch.arange(r, dtype=torch.float64)
    per_k = torch.stack([torch.where(i < k, alpha / k if scaling == "dylora" else alpha / r, 0.0)
                         for k in ks])  # [|K|, r]
    total = per_k.sum(0) if cfg.matryoshka_weighting == "sum" else per_k.mean(0)
    return (total / (alpha / r)).float()


class MatryoshkaStep:
    """Matryoshka weighting for one model (one rank): the diagonal is set before every step and
    lifted for evaluation (`full`). Draws no random numbers; updates every component."""

    def __init__(self, model, cfg: ExperimentConfig, mask: torch.Tensor, scaling: str = "dylora"):
        alpha = model.peft_config["default"].lora_alpha
        self.mask = mask
        self.weights = matryoshka_weights(cfg, current_rank(model), alpha, scaling).to(mask.device)

    def next_rank(self) -> None:
        return None

    def begin(self, b=None) -> None:
        self.mask.copy_(self.weights)

    def end(self) -> None:
        pass

    def full(self) -> None:
        """All components at the model's own scaling (for evaluation)."""
        self.mask.fill_(1.0)

    def close(self) -> None:
        pass


@contextmanager
def nested_training(model, cfg: ExperimentConfig, mode: str | None = "dylora", scaling: str | None = None):
    """Yield the step helper of `mode` ("dylora": NestedStep, "matryoshka": MatryoshkaStep) with
    sub-adapters at the cut `scaling` (default the `matryoshka` method's for "matryoshka",
    "dylora" for "dylora") for `model`, or None when `mode` is None; hooks are removed on exit."""
    if scaling is None:
        scaling = "preserve" if mode == "matryoshka" and cfg.matryoshka_weighting == "sum" else "dylora"
    if mode is None:
        yield None
        return
    if mode not in ("dylora", "matryoshka"):
        raise ValueError(f"nested mode {mode!r}: must be 'dylora' or 'matryoshka'")
    with component_mask(model) as mask:
        step = NestedStep(model, cfg, mask, scaling) if mode == "dylora" else MatryoshkaStep(model, cfg, mask, scaling)
        try:
            yield step
        finally:
            step.close()
