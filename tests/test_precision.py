"""Mixed precision: the choice of dtype, and the autocast + GradScaler path exercised on CPU."""
import pytest
import torch

from hybrid_lora import run_experiment
from hybrid_lora.adapters import lora_factors
from hybrid_lora.evaluate import choose_amp_dtype

from conftest import tiny_config


@pytest.mark.parametrize("mode, device, capability, expected", [
    ("auto", "cpu", None, None),
    ("auto", "cuda", (7, 5), torch.float16),   # T4: bf16 only emulated
    ("auto", "cuda", (7, 0), torch.float16),   # V100
    ("auto", "cuda", (8, 0), torch.bfloat16),  # A100
    ("auto", "cuda", (9, 0), torch.bfloat16),  # H100
    ("no", "cuda", (8, 0), None),
    ("fp16", "cpu", None, torch.float16),
    ("bf16", "cuda", (7, 5), torch.bfloat16),
])
def test_amp_dtype_is_decided_by_compute_capability(mode, device, capability, expected):
    assert choose_amp_dtype(mode, torch.device(device), capability) is expected


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        tiny_config(mixed_precision="fp8")


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_autocast_run_keeps_lora_weights_fp32_and_tracks_fp32_run(mode, tmp_path, monkeypatch):
    import hybrid_lora.runs as train

    kept = {}
    real = train.train_stage

    def spy(model, *args, **kwargs):
        model, rows = real(model, *args, **kwargs)
        kept["dtypes"] = {t.dtype for _, a, b, _ in lora_factors(model) for t in (a, b)}
        return model, rows

    monkeypatch.setattr(train, "train_stage", spy)
    low = run_experiment(tiny_config(mixed_precision=mode), "hybrid", 1, tmp_path / mode, progress=False)
    assert kept["dtypes"] == {torch.float32}
    full = run_experiment(tiny_config(mixed_precision="no"), "hybrid", 1, tmp_path / "fp32", progress=False)
    for key in ("A_after_stage1", "A_after_stage2", "B_after_stage2"):
        assert low["metrics"][key]["loss"] == pytest.approx(full["metrics"][key]["loss"], abs=0.05)
        assert low["metrics"][key]["loss"] != full["metrics"][key]["loss"]  # autocast was really on
