"""Budgeted rank allocation across modules (methods `dynamic`, `dynamic_protect`; after Dynamic
LoRA's layer-importance reallocation, with AdaLoRA's schedule).

Every module starts at rank r (cfg.r). Component i of module m (row i of A, column i of B)
costs in_m + out_m parameters. In each stage the budget, in parameters, falls from the whole
trainable adapter B_0 to B_T, the parameters of uniform rank r_T = `target_rank(cfg)` (the
rank schedule's last rank) on every module, along AdaLoRA's cubic schedule over the stage's
T optimizer steps: B_0 for t <= t_init, then B_T + (B_0 - B_T) (1 - (t - t_init) / (T - t_final
- t_init))^3, recomputing the masks every `alloc_delta_t` steps, and B_T from t = T - t_final on
(the final masks are taken there). A mask keeps the components above one global threshold on
importance (`importance.py`, estimator cfg.importance): components sorted by importance, best
first, kept while their running cost fits the budget, so the budget is never exceeded.

Masked components are multiplied by 0 in the forward pass (a hook on lora_A's output) and keep
their weights exactly (put back after each optimizer step, as Adam's momentum and weight decay
would move them). With a plain multiplier their A row and B column get no gradient, so their
sensitivity and Fisher scores decay and masking is final in effect. `cfg.alloc_regrow` keeps the
gradient alive: the hook adds (out - out.detach()) on masked components, zero in value, so the
forward pass is the masked one while the A row of a masked component gets the gradient it
would get unmasked; its scores then follow its importance and it comes back when that rises. At the end of a stage the
masked components are zeroed in the weights: the adapter then computes the masked function
without hooks and saves as a rank-r PEFT adapter; `save_allocated` writes the compact one with
PEFT's `rank_pattern`. A later stage first gives the zeroed components a fresh A row (PEFT's init)
and a zero B column (`revive`); `dynamic` re-allocates them all, `dynamic_protect` freezes the
components earlier stages kept (they are not trained and do not count against the new budget).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from ..adapters import ADAPTER, is_adalora, lora_layers
from ..config import IMPORTANCES, ExperimentConfig
from ..distributed import all_reduce, broadcast, is_main
from .adalora import AdaLoraStep
from .importance import Importance
from .schedule import budget_at, mask_to_budget, module_name, moment_variance, schedule_steps, target_rank


@torch.no_grad()
def revive(model) -> list[torch.Tensor]:
    """Give every zeroed component (A row and B column all zero: masked in an earlier stage) a
    fresh A row, uniform on +-1/sqrt(in) (PEFT's kaiming init), drawn from process 0's global RNG
    (every process gets the same), and a zero B column. Returns per module the bool [r] of revived
    components."""
    revived = []
    for _, mod in lora_layers(model):
        a, b = mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight
        dead = (a == 0).all(1) & (b == 0).all(0)                      # [r]
        bound = 1 / math.sqrt(a.shape[1])
        # other processes run their own dropout streams: the new weights must be process 0's
        fresh = broadcast((torch.rand(a.shape, dtype=a.dtype) * 2 - 1) * bound if is_main() else None)  # [r, in]
        a.copy_(torch.where(dead[:, None], fresh.to(a.device), a))
        revived.append(dead.cpu())
    return revived


class Allocator:
    """The allocation of one stage of `total` optimizer steps on `model` (one rank r), with
    `frozen` components (bool [r] per module) left out of training and of the budget. The train
    loop calls `before_step`, then `observe` after backward (gradients unscaled), `after_step`
    after the optimizer step; `log` at each epoch's end; `finalize` at the stage's end."""

    def __init__(self, model, cfg: ExperimentConfig, total: int, frozen=None):
        layers = lora_layers(model)
        self.names = [module_name(n) for n, _ in layers]
        self.factors = [(m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight) for _, m in layers]
        r = self.factors[0][0].shape[0]
        device = self.factors[0][0].device
        self.costs = [a.shape[1] + b.shape[0] for a, b in self.factors]
        self.frozen = [f.cpu().clone() for f in frozen] if frozen is not None else \
            [torch.zeros(r, dtype=torch.bool) for _ in layers]
        self.masks = [torch.ones(r, dtype=torch.bool) for _ in layers]
        self.on = [torch.ones(r, device=device) for _ in layers]  # the hooks' multipliers
        self.off = [torch.zeros(r, device=device) for _ in layers]  # 1 on masked components
        self.regrow = cfg.alloc_regrow
        self.train = [torch.ones(r, dtype=torch.bool, device=device) for _ in layers]  # updated ones
        self.importance = Importance(self.factors, [m.scaling[ADAPTER] for _, m in layers],
                                     cfg.alloc_beta1, cfg.alloc_beta2)
        self.kind, self.delta_t, self.total = cfg.importance, cfg.alloc_delta_t, total
        self.t_init, self.t_final = schedule_steps(cfg, total)
        self.b0 = self._trainable_params()
        self.b_target = sum(c * target_rank(cfg) for c in self.costs)
        self.t, self.budget = 0, self.b0
        # the step's input moments per module: sum of x^2, count of positions, per-feature sums
        self.moments = [torch.zeros(2 + a.shape[1], device=device) for a, _ in self.factors]
        self.live = [p.detach() for ab in self.factors for p in ab]
        self.before = [p.clone() for p in self.live]
        self._sync()  # frozen components are never updated
        self.hooks = []
        for i, (_, mod) in enumerate(layers):
            self.hooks.append(mod.register_forward_pre_hook(lambda m, args, i=i: self._see(m, args[0], i)))
            self.hooks.append(mod.lora_A[ADAPTER].register_forward_hook(
                lambda _m, _inp, out, i=i: self._masked(out, i)))

    def _masked(self, out: torch.Tensor, i: int) -> torch.Tensor:
        """lora_A's output [..., r] of module i with the masked components at 0; under
        `alloc_regrow` their gradient still reaches A (the added term is 0 in value)."""
        if self.regrow and out.requires_grad:
            return out * self.on[i] + (out - out.detach()) * self.off[i]
        return out * self.on[i]

    def _trainable_params(self) -> int:
        """B_0: the parameters of every component that is not frozen."""
        return sum(c * int((~f).sum()) for c, f in zip(self.costs, self.frozen))

    def _see(self, mod, x, i: int) -> None:
        if mod.training and torch.is_grad_enabled():  # training steps only, not evaluation
            x = x.detach().reshape(-1, x.shape[-1]).float()  # [positions, in]
            m = self.moments[i]
            m[0] += x.square().sum()
            m[1] += x.shape[0]
            m[2:] += x.sum(0)

    def before_step(self) -> None:
        torch._foreach_copy_(self.before, self.live)

    def observe(self) -> None:
        """Take this step's gradients and input variances into the importance averages. The
        variance is that of the whole step's input (every micro-batch and process: the moments
        are summed first), so it does not depend on how the batch was split."""
        sizes = [len(m) for m in self.moments]
        summed = all_reduce(torch.cat(self.moments)).split(sizes)  # one collective per step
        var = torch.stack([moment_variance(m) for m in summed])
        self.importance.observe(var)
        for m in self.moments:
            m.zero_()

    @torch.no_grad()
    def after_step(self) -> None:
        """Put back masked and frozen components; advance the schedule, re-masking on it."""
        for i, (a, b) in enumerate(self.factors):
            a.copy_(torch.where(self.train[i][:, None], a, self.before[2 * i]))
            b.copy_(torch.where(self.train[i][None, :], b, self.before[2 * i + 1]))
        self.t += 1
        budget, remask = budget_at(self.t, self.total, self.t_init, self.t_final, self.b0,
                                   self.b_target, self.delta_t)
        if remask:
            self.budget = budget
            self.masks = mask_to_budget(self.importance.scores(self.kind), self.costs, self.budget, self.frozen)
            self._sync()

    def params(self, frozen: bool = False) -> int:
        """Parameters of the kept components that train (`frozen=True`: of the frozen ones)."""
        return sum(c * int((m & (f if frozen else ~f)).sum())
                   for c, m, f in zip(self.costs, self.masks, self.frozen))

    def log(self) -> dict:
        """This moment's allocation: per-module ranks (frozen components included), parameters of
        the kept trained components and of the frozen ones, the budget the masks were fitted to
        (params <= budget), and every estimator's per-component scores (lists per module)."""
        return {"modules": self.names, "costs": self.costs, "ranks": [int(m.sum()) for m in self.masks],
                "params": self.params(), "frozen_params": self.params(frozen=True), "budget": self.budget,
                "step": self.t,
                "importance": {k: [s.tolist() for s in self.importance.scores(k)] for k in IMPORTANCES}}

    @torch.no_grad()
    def finalize(self) -> None:
        """Zero the masked components in the weights (the adapter then needs no hooks)."""
        for (a, b), m in zip(self.factors, self.masks):
            m = m.to(a.device)
            a.mul_(m[:, None]), b.mul_(m[None, :])

    def state_dict(self) -> dict:
        return {"t": self.t, "budget": self.budget, "masks": torch.stack(self.masks),
                "frozen": torch.stack(self.frozen), "importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.budget = state["t"], state["budget"]
        self.masks, self.frozen = list(state["masks"].clone()), list(state["frozen"].clone())
        self.b0 = self._trainable_params()
        self.importance.load_state_dict(state["importance"])
        self._sync()

    def _sync(self) -> None:
        """Copy the masks to the device once per change, not per step: the hooks' multipliers
        and the components each step updates (kept, not frozen)."""
        for on, off, train, m, f in zip(self.on, self.off, self.train, self.masks, self.frozen):
            on.copy_(m)
            off.copy_(~m)
            train.copy_(m & ~f)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


@contextmanager
def allocating(model, cfg: ExperimentConfig, mode: str | None, stage: int, total: int,
               state: dict | None = None):
    """Yield the `Allocator` of `mode` ("budget": `dynamic`, "protect": `dynamic_protect`;
    "adalora": `adalora.AdaLoraStep`) for a stage of `total` steps, or None when `mode` is None.
    A fresh stage >= 2 first revives the components zeroed before (`protect` freezes the
    others); `state` (a checkpoint's) resumes."""
    if mode is None:
        yield None
        return
    if mode not in ("budget", "protect", "adalora"):
        raise ValueError(f"allocation {mode!r}: must be 'budget', 'protect' or 'adalora'")
    if mode == "adalora":

        alloc = AdaLoraStep(model, cfg, total)
    else:
        frozen = None
        if state is None and stage > 1:
            revived = revive(model)
            frozen = [~r for r in revived] if mode == "protect" else None
        alloc = Allocator(model, cfg, total, frozen)
    if state is not None:
        alloc.load_state_dict(state)
    try:
        yield alloc
    finally:
        alloc.close()


def save_allocated(model, path: str | Path) -> Path:
    """Save `model`'s adapter cut to its live components (A row and B column not all zero) as a
    PEFT adapter: per-module `rank_pattern`, `alpha_pattern` keeping each component's scaling,
    modules with no component left out of `target_modules`. `PeftModel.from_pretrained` loads it."""
    from safetensors.torch import save_file

    peft_cfg = model.peft_config[ADAPTER]
    path = Path(path)
    if is_adalora(model):  # PEFT's own save cuts AdaLoRA to its rank_pattern
        model.save_pretrained(str(path), save_embedding_layers=False)
        return path
    path.mkdir(parents=True, exist_ok=True)
    tensors, ranks, alphas = {}, {}, {}
    for name, mod in lora_layers(model):
        a, b = mod.lora_A[ADAPTER].weight.detach(), mod.lora_B[ADAPTER].weight.detach()
        live = ~((a == 0).all(1) & (b == 0).all(0))  # [r]
        k = int(live.sum())
        if k == 0:
            continue
        ranks[module_name(name)] = k
        alphas[module_name(name)] = mod.scaling[ADAPTER] * k  # alpha_k / k = the trained scaling
        tensors[f"{name}.lora_A.weight"] = a[live].contiguous().cpu()
        tensors[f"{name}.lora_B.weight"] = b[:, live].contiguous().cpu()
    config = peft_cfg.to_dict()
    config.update(target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=alphas,
                  r=max(ranks.values(), default=1))
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    save_file(tensors, path / "adapter_model.safetensors")
    return path
