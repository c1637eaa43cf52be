"""PEFT's AdaLoRA as the baseline of budgeted allocation (method `adalora`), driven through the
same stage interface as `allocation.allocator.Allocator`.

PEFT's `update_and_allocate(global_step)` is called after every optimizer step, while the
gradients are still there, as PEFT requires; the orthogonality penalty its `forward` adds to a
`labels` loss is added by the train loop instead (it computes CE from logits). Differences
from `dynamic` that a comparison must keep in mind: AdaLoRA's budget counts components
(target_r per module on average), not parameters, so its final parameter count is measured,
not matched; masked components keep their P and Q with E = 0. Each stage restarts its
schedule (tinit, tfinal from cfg's shares of the stage's steps, deltaT) with fresh importance
averages. Its RankAllocator's averages and the rank pattern are not in PEFT's saved adapters,
so `state_dict` puts them into our checkpoints.
"""
from __future__ import annotations

from ..adapters import ADAPTER, lora_layers
from ..config import ExperimentConfig
from .schedule import module_name, schedule_steps

_AVERAGES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class AdaLoraStep:
    """The AdaLoRA schedule of one stage of `total` steps on `model` (a PEFT AdaLoRA model)."""

    def __init__(self, model, cfg: ExperimentConfig, total: int):
        self.model, self.total, self.t = model, total, 0
        self.config = model.peft_config[ADAPTER]
        t_init, t_final = schedule_steps(cfg, total)
        self.config.total_step, self.config.tinit, self.config.tfinal = total, t_init, t_final
        self.config.deltaT, self.config.rank_pattern = cfg.alloc_delta_t, None
        self.allocator = model.base_model.rankallocator
        self.allocator.reset_ipt()
        layers = lora_layers(model)
        self.names = [module_name(n) for n, _ in layers]
        self.r = [m.lora_A[ADAPTER].shape[0] for _, m in layers]
        # AdaLoRA trains E too: one more parameter per component
        self.costs = [m.lora_A[ADAPTER].shape[1] + m.lora_B[ADAPTER].shape[0] + 1 for _, m in layers]

    def before_step(self) -> None:
        pass

    def observe(self) -> None:
        pass

    def after_step(self) -> None:
        self.t += 1
        self.model.base_model.update_and_allocate(self.t)

    def ranks(self) -> list[int]:
        """Per module the components its rank pattern keeps (all before the first masking)."""
        pattern = self.config.rank_pattern
        if not pattern:
            return list(self.r)
        kept = {module_name(k).split(".lora_E")[0]: sum(v) for k, v in pattern.items()}
        return [kept[n] for n in self.names]

    def scores(self) -> list[list[float]]:
        """Per module the component scores PEFT's `mask_to_budget` ranks by: the smoothed
        sensitivity x uncertainty of E_i plus its means over A's row i and B's column i
        ([] once the final allocation has cleared the averages)."""
        if not self.allocator.exp_avg_ipt:
            return []
        score = self.allocator._element_score  # noqa: SLF001 - PEFT's own formula, by parameter name
        return [(score(f"{m}.lora_E.{ADAPTER}").flatten() + score(f"{m}.lora_A.{ADAPTER}").mean(1)
                 + score(f"{m}.lora_B.{ADAPTER}").mean(0)).tolist() for m in self.names]

    def log(self) -> dict:
        """The `Allocator.log` entry; "budget" is None (AdaLoRA budgets components, not
        parameters); "importance" holds AdaLoRA's own scores under "sensitivity"."""
        ranks = self.ranks()
        scores = self.scores()
        return {"modules": self.names, "costs": self.costs, "ranks": ranks,
                "params": sum(c * k for c, k in zip(self.costs, ranks)), "frozen_params": 0,
                "budget": None, "step": self.t, "importance": {"sensitivity": scores} if scores else {}}

    def finalize(self) -> None:
        pass  # the masked components already have E = 0

    def state_dict(self) -> dict:
        pattern = self.config.rank_pattern
        return {"t": self.t, "rank_pattern": dict(pattern) if pattern else None,
                **{k: {n: v.cpu() for n, v in getattr(self.allocator, k).items()} for k in _AVERAGES}}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.config.rank_pattern = state["t"], state["rank_pattern"]
        device = next(self.model.parameters()).device
        for k in _AVERAGES:
            setattr(self.allocator, k, {n: v.to(device) for n, v in state[k].items()})

    def close(self) -> None:
        pass
