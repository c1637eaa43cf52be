"""Experiment tracking (`cfg.report_to`): TensorBoard and Weights & Biases through accelerate's
trackers (`accelerate.tracking`), one run folder each. Only the main process logs.

What is logged, on one step axis across stages (stage 2's first optimizer step follows stage
1's last; `step_offsets`): every optimizer step `train/ce` (the batch's token-mean
cross-entropy, all processes), each regularizer term in force (`train/order`, `train/dc`,
`train/penalty`, as weighted in the loss) and `train/rank`; every epoch `eval/loss`,
`eval/acc` (the stage's domain, as in history.json), `train/rank` and `cos_to_stage1`; after
each stage the loss and accuracy on every domain (`eval/A_loss`, `eval/B_acc`, ...: the row of
the R matrix); at the start the run's config as hyperparameters. TensorBoard writes to
`<run>/tensorboard/`; W&B to the project `$WANDB_PROJECT` (default "hybrid-lora") under the run's
name. A resumed run appends: steps after its last checkpoint are logged again.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .config import REPORTERS  # noqa: F401 - the trackers report_to may name
from .distributed import is_main

LETTERS = "ABCDEFGHIJ"


def hparams(config: dict) -> dict:
    """`config` flattened to the types trackers take (str, int, float, bool): tuples and None as text."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            continue  # fingerprints: not a setting
        out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


class Tracking:
    """The run's open trackers; `log(values, step)` sends scalars to each."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        for tracker in self.trackers:
            tracker.log(values, step=int(step))

    def log_epoch(self, row: dict, step: int) -> None:
        """An epoch's row of history.json: its evaluation, rank and cosine to Stage 1."""
        self.log({"eval/loss": row.get("eval_loss"), "eval/acc": row.get("eval_acc"),
                  "train/rank": row.get("rank"), "cos_to_stage1": row.get("cos_to_stage1")}, step)

    def log_stage(self, evals: list[dict], step: int) -> None:
        """A row of R: the loss and accuracy on every domain after a stage."""
        values = {}
        for letter, e in zip(LETTERS, evals):
            values[f"eval/{letter}_loss"], values[f"eval/{letter}_acc"] = e["loss"], e["acc"]
        self.log(values, step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def open_tracking(cfg, rd: Path, name: str, config: dict) -> Tracking | None:
    """The trackers of `cfg.report_to` for the run in folder `rd` named `name` (e.g.
    "dc/seed42"), started and given `config`; None when nothing is reported or on a process
    other than the main one. ImportError naming the package a tracker needs."""
    if not cfg.report_to or not is_main():
        return None
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for kind in cfg.report_to:
        package = {"tensorboard": "tensorboard", "wandb": "wandb"}[kind]
        try:
            __import__(package)
        except ImportError:
            raise ImportError(f"report_to={kind!r} needs the {package} package: pip install {package}") from None
        if kind == "tensorboard":
            tracker = TensorBoardTracker("tensorboard", str(rd))
        else:
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "hybrid-lora"), name=name, dir=str(rd))
        tracker.start()
        tracker.store_init_configuration(hparams(config))
        trackers.append(tracker)
    return Tracking(trackers)


def step_offsets(steps_per_stage: list[int]) -> list[int]:
    """The step before each stage's first optimizer step on the run's one step axis."""
    offsets, total = [], 0
    for steps in steps_per_stage:
        offsets.append(total)
        total += steps
    return offsets
