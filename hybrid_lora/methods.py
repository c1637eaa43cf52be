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

    def lambdas(self, cfg: ExperimentConfig, stage: int) -> tuple[float, float]:
        """(lambda_order, lambda_dc) in force in `stage`; 0.0 where the term is off."""
        return (cfg.lambda_order if stage in self.order_stages else 0.0,
                cfg.lambda_dc if stage in self.dc_stages else 0.0)

    def stage2_ranks(self, cfg: ExperimentConfig) -> tuple[int, ...]:
        """The LoRA rank of each Stage-2 epoch."""
        return cfg.rank_schedule if self.rank_schedule else (cfg.r,) * cfg.epochs_stage2


METHODS = {m.name: m for m in (
    Method("lora", (), (), False, "plain LoRA: cross-entropy only, fixed rank"),
    Method("dylora", (1, 2), (), True, "CE + ordering regularizer; Stage-2 rank schedule"),
    Method("dc", (), (2,), False, "CE + domain-correlation loss in Stage 2; fixed rank"),
    Method("hybrid", (1, 2), (2,), True, "CE + ordering + DC in Stage 2; Stage-2 rank schedule"),
)}
assert tuple(METHODS) == METHOD_NAMES, "config.METHOD_NAMES and the method table disagree"


def get_method(name: str) -> Method:
    """The Method called `name`; ValueError naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {tuple(METHODS)}")
    return METHODS[name]
