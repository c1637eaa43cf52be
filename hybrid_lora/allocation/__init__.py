"""Budgeted rank allocation: which rank components of which modules a stage keeps.

- `schedule`   the budget arithmetic: target rank, AdaLoRA's cubic schedule, the mask within a budget;
- `importance` the three estimators of a component's importance (sensitivity, fisher, activation);
- `allocator`  `Allocator` (methods `dynamic`, `dynamic_protect`), `allocating` (the stage's
               allocator for a method), `revive`, `save_allocated` (the cut adapter, PEFT
               `rank_pattern`);
- `adalora`    `AdaLoraStep`: PEFT's AdaLoRA driven through the same stage interface (baseline).

Imports flow one way: schedule <- importance, adalora <- allocator.
"""
from .adalora import AdaLoraStep
from .allocator import Allocator, allocating, revive, save_allocated
from .importance import Importance
from .schedule import budget_at, mask_to_budget, module_name, moment_variance, schedule_steps, target_rank

__all__ = ["AdaLoraStep", "Allocator", "Importance", "allocating", "budget_at", "mask_to_budget",
           "module_name", "moment_variance", "revive", "save_allocated", "schedule_steps", "target_rank"]
