"""The method table: each method is data (which loss terms in which stage, rank schedule or not).

The training loop has one code path; methods differ only by these fields (defect 5 of the
original: the ordering term must be off in both stages for plain `lora`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import METHOD_NAMES, ExperimentConfig


@dataclass(frozen=True)
class Method:
    name: str
    order_stages: tuple[int, ...]  # stages (1, 2) in which the ordering regularizer is on
    dc_stages: tuple[int, ...]     # stages in which the domain-correlation loss is on
    rank_schedule: bool            # Stage 2 follows cfg.rank_schedule (rebuild each epoch)
    description: str
    nested_stages: tuple[int, ...] = ()  # stages trained with DyLoRA's sampled rank b per step
    small: bool = False            # train at the schedule's last rank instead of cfg.r

    def lambdas(self, cfg: ExperimentConfig, stage: int) -> tuple[float, float]:
        """(lambda_order, lambda_dc) in force in `stage`; 0.0 where the term is off."""
        return (cfg.lambda_order if stage in self.order_stages else 0.0,
                cfg.lambda_dc if stage in self.dc_stages else 0.0)

    def train_rank(self, cfg: ExperimentConfig) -> int:
        """The LoRA rank the run starts with."""
        return cfg.rank_schedule[-1] if self.small else cfg.r

    def stage_ranks(self, cfg: ExperimentConfig, stage: int) -> tuple[int, ...]:
        """The LoRA rank of each epoch of `stage`."""
        if stage == 2 and self.rank_schedule:
            return cfg.rank_schedule
        return (self.train_rank(cfg),) * (cfg.epochs_stage1 if stage == 1 else cfg.epochs_stage2)

    def stage2_ranks(self, cfg: ExperimentConfig) -> tuple[int, ...]:
        """The LoRA rank of each Stage-2 epoch."""
        return self.stage_ranks(cfg, 2)

    def cut_scaling(self, cfg: ExperimentConfig) -> str:
        """How this method's adapters are cut to a lower rank, in training (rebuild) and sweeps.

        Nested (DyLoRA) training runs rank b with alpha/b, so its cuts keep lora_alpha
        ("dylora"; `rebuild_model_for_new_rank` calls it "peft"); the others keep each
        kept component's contribution ("preserve") unless cfg.rebuild_scaling says "peft".
        """
        if self.nested_stages:
            return "dylora"
        return "dylora" if cfg.rebuild_scaling == "peft" else "preserve"


METHODS = {m.name: m for m in (
    Method("lora", (), (), False, "plain LoRA: cross-entropy only, fixed rank"),
    Method("dylora", (1, 2), (), True, "CE + ordering regularizer; Stage-2 rank schedule"),
    Method("dc", (), (2,), False, "CE + domain-correlation loss in Stage 2; fixed rank"),
    Method("hybrid", (1, 2), (2,), True, "CE + ordering + DC in Stage 2; Stage-2 rank schedule"),
    Method("dylora_nested", (), (), True, "true DyLoRA: CE at a sampled rank b per step (alpha/b), "
           "instead of the ordering term; Stage-2 rank schedule", nested_stages=(1, 2)),
    Method("hybrid_nested", (1, 2), (2,), True, "hybrid with DyLoRA's sampled-rank training added "
           "to the ordering term and DC", nested_stages=(1, 2)),
    Method("lora_small", (), (), False, "plain LoRA trained directly at the schedule's last rank "
           "(16 in the paper), lora_alpha unchanged", small=True),
)}
assert tuple(METHODS) == METHOD_NAMES, "config.METHOD_NAMES and the method table disagree"


def get_method(name: str) -> Method:
    """The Method called `name`; ValueError naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {tuple(METHODS)}")
    return METHODS[name]
