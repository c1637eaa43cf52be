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


def test_bf16_on_cpu_keeps_lora_weights_and_optimizer_state_fp32(tmp_path):
    from safetensors.torch import load_file

    from hybrid_lora.results import read_json, run_dir

    cfg = tiny_config(mixed_precision="bf16", device="cpu", keep_checkpoints=True, checkpoint_every=0)
    run_experiment(cfg, "hybrid", 1, tmp_path, progress=False)
    rd = run_dir(tmp_path, "hybrid", 1)
    latest = read_json(rd / "checkpoints" / "latest.json")["dir"]
    state = torch.load(rd / "checkpoints" / latest / "state.pt", weights_only=True)
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert {t.dtype for t in load_file(rd / "adapter_final" / "adapter_model.safetensors").values()} == {torch.float32}
    history = read_json(rd / "history.json")
    assert all(torch.isfinite(torch.tensor(row["train_ce"])) for row in history)


SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, native", [(SKYLAKE, False), (SAPPHIRE, True), (GRAVITON3, True), ("", False)])
def test_cpu_bf16_support_is_read_from_the_cpu_flags(text, native):
    from hybrid_lora.train import cpu_bf16_native

    assert cpu_bf16_native(text) is native


def test_device_report_on_a_cpu_that_computes_bf16_suggests_it(monkeypatch):
    import hybrid_lora.train as train

    monkeypatch.setattr(train, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = train.device_report(tiny_config(device="auto"))
    assert line.startswith("Running on CPU (no GPU found; device='auto'); fp32") and "mixed_precision=bf16" in line
    assert "bf16 autocast" in train.device_report(tiny_config(device="auto", mixed_precision="bf16"))
    monkeypatch.setattr(train, "cpu_bf16_native", lambda: False)
    assert train.device_report(tiny_config(device="auto")).endswith("bf16 only by emulation (slow)")


@pytest.mark.parametrize("native, mode, warned", [(False, "bf16", True), (True, "bf16", False),
                                                  (None, "bf16", False), (False, "no", False)])
def test_a_run_asking_bf16_on_a_cpu_that_only_emulates_it_warns(monkeypatch, tmp_path, native, mode, warned):
    """Regression: a bf16 run on an AMD EPYC without AVX512-BF16 did not finish 125 steps in 28
    min and said nothing; the run now warns through the path users take (run_experiment)."""
    import warnings

    import hybrid_lora.train as train

    monkeypatch.setattr(train, "cpu_bf16_native", lambda *_: native)
    cfg = tiny_config(mixed_precision=mode, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_experiment(cfg, "lora", 1, tmp_path, progress=False)
    emulated = [w for w in caught if "torch emulates bf16 here" in str(w.message)]
    assert len(emulated) == (1 if warned else 0)


EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.mark.parametrize("text, hardware", [
    (EPYC, "CPU AMD EPYC (bf16 emulated)"),
    ("model name\t: Intel(R) Xeon(R) Platinum 8481C\n" + SAPPHIRE, "CPU Intel(R) Xeon(R) Platinum 8481C (bf16 native)"),
])
def test_machine_report_names_the_cpu_and_whether_it_computes_bf16(text, hardware):
    from hybrid_lora.train import machine_report

    line = machine_report(torch.device("cpu"), text)
    assert line == f"{hardware}; torch {torch.__version__}; {torch.get_num_threads()} threads"


def test_every_epoch_of_a_run_records_the_machine_it_trained_on(tmp_path):
    """Regression: bf16 runs of one config differed by 0.012 nats across two sessions and the
    files did not say the machines differed; each history row now names its machine."""
    from hybrid_lora.results import read_json, run_dir
    from hybrid_lora.train import machine_report

    run_experiment(tiny_config(device="cpu"), "lora", 1, tmp_path, progress=False)
    history = read_json(run_dir(tmp_path, "lora", 1) / "history.json")
    assert [row["machine"] for row in history] == [machine_report(torch.device("cpu"))] * len(history)
