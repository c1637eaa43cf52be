"""The budget arithmetic of rank allocation, shared by `allocator` and `adalora`: the target
rank, module names, AdaLoRA's cubic budget schedule over a stage's steps, and the mask that
keeps the most important components within a budget."""
from __future__ import annotations

import math

import torch

from ..config import ExperimentConfig


def moment_variance(m: torch.Tensor) -> torch.Tensor:
    """The mean over features of the variance over positions, from summed moments
    m = [sum of x^2, positions, per-feature sums of x (d)]: E[x^2] - mean_f E[x_f]^2."""
    n = m[1].clamp(min=1)
    return m[0] / (n * (len(m) - 2)) - (m[2:] / n).square().mean()


def target_rank(cfg: ExperimentConfig) -> int:
    """r_T: the per-module rank whose uniform adapter sets the budget (rank_schedule[-1])."""
    return cfg.rank_schedule[-1]


def module_name(name: str) -> str:
    """A LoRA module's name in the base model (PEFT's wrapper prefix removed)."""
    return name.removeprefix("base_model.model.")


def schedule_steps(cfg: ExperimentConfig, total: int) -> tuple[int, int]:
    """(t_init, t_final) in steps of a stage of `total` steps; ValueError when no step is left
    for budgeting."""
    t_init, t_final = math.floor(cfg.alloc_tinit * total), math.floor(cfg.alloc_tfinal * total)
    if total - t_final <= t_init:
        raise ValueError(f"alloc_tinit={cfg.alloc_tinit}, alloc_tfinal={cfg.alloc_tfinal}: a stage of "
                         f"{total} steps leaves no step for budgeting; lower them or train longer")
    return t_init, t_final


def budget_at(t: int, total: int, t_init: int, t_final: int, b0: int, b_target: int,
              delta_t: int) -> tuple[int, bool]:
    """(the budget after step t (1-based) of `total`, whether the masks are recomputed there)."""
    if t <= t_init:
        return b0, False
    if t >= total - t_final:
        return b_target, t == total - t_final
    frac = 1 - (t - t_init) / (total - t_final - t_init)
    return int(b_target + (b0 - b_target) * frac**3), (t - t_init) % delta_t == 0


def mask_to_budget(scores, costs, budget: int, fixed=None) -> list[torch.Tensor]:
    """Per module a bool [r] of kept components: `fixed` ones (bool [r] per module) always, outside
    the budget; of the others the best by `scores` ([r] per module) while their summed `costs`
    (parameters per component of each module) stay <= `budget`. Ties keep module order."""
    sizes = [len(s) for s in scores]
    flat = torch.nan_to_num(torch.cat([s.detach().float().cpu() for s in scores]), nan=-math.inf)
    cost = torch.cat([torch.full((n,), c, dtype=torch.long) for n, c in zip(sizes, costs)])
    keep = torch.cat([f.cpu() for f in fixed]) if fixed is not None else torch.zeros(len(flat), dtype=torch.bool)
    free = torch.nonzero(~keep).flatten()
    order = free[torch.argsort(flat[free], descending=True, stable=True)]
    keep[order[torch.cumsum(cost[order], 0) <= budget]] = True  # a prefix: costs are positive
    return list(keep.split(sizes))
