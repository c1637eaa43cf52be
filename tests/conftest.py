"""Shared fixtures: tiny configs that run in seconds on CPU, with no network."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hybrid_lora import ExperimentConfig  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-imdb-base"


def tiny_config(**changes) -> ExperimentConfig:
    """Smaller than the smoke preset: 16 train / 8 eval samples of 32 bytes, 1 + 3 epochs."""
    base = dataclasses.replace(ExperimentConfig.smoke(), n_train=16, n_eval=8, max_length=32,
                               batch_size=4, epochs_stage1=1)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def cfg() -> ExperimentConfig:
    return tiny_config()


def randomize_lora(model, seed: int = 0, scale: float = 0.5) -> None:
    """Give every LoRA A and B random values (B starts at zero, which would hide bugs)."""
    from hybrid_lora.adapters import lora_factors

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a, b, _ in lora_factors(model):
            a.copy_(torch.randn(a.shape, generator=g) * scale)
            b.copy_(torch.randn(b.shape, generator=g) * scale)


def write_fake_run(d, method: str, seed: int, metrics: dict, history: list) -> None:
    """A finished two-domain run folder from hand-written evaluations (A_base, B_base,
    A_after_stage1, A_after_stage2, B_after_stage2; B after Stage 1 taken equal to B_base),
    its metrics.json written by `results.run_metrics`, the same code path as a real run."""
    from hybrid_lora.results import run_metrics, write_json_atomic

    write_json_atomic(d / "config.json", {**ExperimentConfig.smoke().to_dict(), "method": method, "seed": seed})
    write_json_atomic(d / "history.json", history)
    keys = [["A_base", "B_base"], ["A_after_stage1", "B_base"], ["A_after_stage2", "B_after_stage2"]]
    R = {x: [[metrics[k][x] for k in row] for row in keys] for x in ("loss", "acc")}
    extra = {k: v for k, v in metrics.items() if k.startswith("rank_auc")}
    write_json_atomic(d / "metrics.json", {**run_metrics(("imdb", "yelp"), R["loss"], R["acc"]), **extra})
