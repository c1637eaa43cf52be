"""Other causal-LM families (tiny random LLaMA, Qwen2, GPT-NeoX, OPT) through the whole
pipeline, target-module resolution, and the memory knobs (accumulation, checkpointing)."""
import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from hybrid_lora import evaluate_loss_and_token_acc, run_experiment
from hybrid_lora.adapters import build_base_model, build_model, load_tokenizer, lora_factors
from hybrid_lora.data import make_loaders
from hybrid_lora.families import resolve_target_modules
from hybrid_lora.results import read_json
from hybrid_lora.runs import check_same_run

from conftest import randomize_lora, tiny_config

ATTENTION = {  # what "attention" must resolve to, written out here independently of the code
    "tiny-random-gpt2": {"c_attn"},
    "tiny-random-llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "tiny-random-qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "tiny-random-gpt-neox": {"query_key_value"},
    "tiny-random-opt": {"q_proj", "k_proj", "v_proj", "out_proj"},
}
OTHER_FAMILIES = [m for m in ATTENTION if m != "tiny-random-gpt2"]


def leaf(name):
    return name.split(".")[-1]


@pytest.mark.parametrize("model_name", list(ATTENTION))
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_lora_delta_is_scaling_B_A_x_on_every_family(model_name, targets):
    """Each adapted module computes base(x) + s B A x: checks the module choice and that
    fan_in_fan_out was read right from the module type (a wrong one transposes or fails)."""
    cfg = tiny_config(model_name=model_name, target_modules=(targets,), lora_dropout=0.0)
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.2)
    model.eval()
    names = {leaf(n) for n, *_ in lora_factors(model)}
    if targets == "attention":
        assert names == ATTENTION[model_name]
    else:  # PEFT's all-linear: every linear layer but the output head
        assert ATTENTION[model_name] < names and "lm_head" not in names
    for name, a, b, s in lora_factors(model):
        mod = model.get_submodule(name)
        x = torch.randn(3, a.shape[1], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = mod.base_layer(x) + s * x @ a.T @ b.T  # [3, out]
            assert torch.allclose(mod(x), expected, atol=1e-6), name


def test_unknown_architecture_and_missing_module_errors_list_the_linear_modules():
    cfg = tiny_config(model_name="tiny-random-llama")
    base = build_base_model(cfg)
    base.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no default for architecture 'mystery'.*gate_proj.*q_proj"):
        resolve_target_modules(cfg, base)
    with pytest.raises(ValueError, match="c_attn is not a Linear or Conv1D module.*o_proj"):
        build_model(dataclasses.replace(cfg, target_modules=("c_attn",)))


def test_attention_keywords_stand_alone():
    with pytest.raises(ValueError, match="target_modules.*stand alone"):
        tiny_config(target_modules=("attention", "c_proj"))


def test_saved_c_attn_is_the_same_setting_as_attention_on_gpt2_only(tmp_path):
    now = tiny_config().to_dict()
    saved = {**now, "target_modules": ["c_attn"]}
    del saved["gradient_accumulation_steps"]  # a run made before the field existed
    check_same_run(tmp_path, saved, now)
    llama = tiny_config(model_name="tiny-random-llama").to_dict()
    with pytest.raises(ValueError, match="target_modules"):
        check_same_run(tmp_path, {**llama, "target_modules": ["q_proj"]}, llama)


@pytest.fixture(scope="module", params=OTHER_FAMILIES)
def family_runs(request, tmp_path_factory):
    """Two stages on one family: the rank schedule + ordering + DC (hybrid), nested training,
    an EWC penalty, freeze_add, and the rank sweep of every adapter."""
    out = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config(model_name=request.param)
    runs = {m: run_experiment(cfg, m, seed=3, out_dir=out, progress=False)
            for m in ("hybrid", "dylora_nested", "ewc", "freeze_add")}
    return cfg, out, runs


def test_family_runs_train_save_reload_and_sweep(family_runs):
    cfg, out, runs = family_runs
    tok = load_tokenizer(cfg)
    eval_b = make_loaders(cfg, tok, cfg.domains[1], seed=0).eval
    for m in ("hybrid", "dylora_nested", "ewc"):
        metrics, history = runs[m]["metrics"], runs[m]["history"]
        assert metrics["B_after_stage2"]["loss"] < metrics["B_base"]["loss"], m
        folder = out / m / "seed3" / "adapter_final"
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert set(saved["target_modules"]) == ATTENTION[cfg.model_name]
        # PEFT's own loader on a fresh base gives the numbers the run recorded
        with torch.random.fork_rng():
            reloaded = PeftModel.from_pretrained(build_base_model(cfg, vocab_size=len(tok)), str(folder))
        ev = evaluate_loss_and_token_acc(reloaded.eval(), eval_b)
        assert ev["loss"] == pytest.approx(metrics["B_after_stage2"]["loss"], rel=1e-5), m
        ranks = [row["rank"] for row in history if row["stage"] == 2]
        assert tuple(ranks) == (cfg.rank_schedule if m != "ewc" else (cfg.r,) * cfg.epochs_stage2)
        sweep = read_json(out / m / "seed3" / "sweep.json")
        svd = {p["rank"] for p in sweep if (p["adapter"], p["domain"], p["kind"]) == ("final", "B", "svd")}
        assert svd == {k for k in cfg.sweep_ranks if k <= ranks[-1]}
    assert all(row["train_dc"] > 0 for row in runs["hybrid"]["history"][2:])
    assert all(row["train_penalty"] > 0 for row in runs["ewc"]["history"] if row["stage"] == 2)
    freeze = runs["freeze_add"]["metrics"]
    assert freeze["B_after_stage2"]["loss"] < freeze["B_base"]["loss"]


def test_cli_smoke_preset_takes_another_family(tmp_path):
    from hybrid_lora.cli import main

    code = main(["run", "--preset", "smoke", "--model", "tiny-random-opt", "--methods", "lora",
                 "--set", "n_train=16", "n_eval=8", "max_length=32", "epochs_stage1=1",
                 "--out", str(tmp_path), "--no-progress"])
    assert code in (0, None)
    saved = read_json(tmp_path / "lora" / "seed42" / "config.json")
    assert saved["model_name"] == "tiny-random-opt" and saved["target_modules"] == ["attention"]
    adapter = json.loads((tmp_path / "lora/seed42/adapter_final/adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == ATTENTION["tiny-random-opt"]


# ------------------------------------------------------------------ memory knobs
def final_factors(out, cfg, method):
    from hybrid_lora import load_adapter
    return [(a.clone(), b.clone()) for _, a, b, _ in lora_factors(load_adapter(cfg, out / method / "seed5" / "adapter_final"))]


@pytest.mark.parametrize("method", ["lora", "hybrid"])
def test_gradient_accumulation_equals_the_whole_batch(tmp_path, method):
    """4 micro-batches of 2 = one batch of 8 (token-weighted CE; the ordering and DC terms
    once per step, not once per micro-batch). LLaMA and lora_dropout=0: no dropout anywhere
    (the masks of a split batch differ)."""
    cfg = tiny_config(model_name="tiny-random-llama", batch_size=8, lora_dropout=0.0, n_train=32,
                      max_length=128)  # texts of unequal length: micro-batches of unequal tokens
    acc = dataclasses.replace(cfg, gradient_accumulation_steps=4)
    one = run_experiment(cfg, method, seed=5, out_dir=tmp_path / "one", progress=False)
    four = run_experiment(acc, method, seed=5, out_dir=tmp_path / "four", progress=False)
    for row1, row4 in zip(one["history"], four["history"], strict=True):
        for key in ("train_ce", "train_order", "train_dc", "eval_loss"):
            assert row4[key] == pytest.approx(row1[key], rel=1e-5, abs=1e-7), key
    for (a1, b1), (a4, b4) in zip(final_factors(tmp_path / "one", cfg, method),
                                  final_factors(tmp_path / "four", cfg, method)):
        assert torch.allclose(a1, a4, atol=1e-5) and torch.allclose(b1, b4, atol=1e-5)


def test_gradient_checkpointing_and_eval_batch_size_change_no_numbers(tmp_path):
    """Recomputing activations replays the dropout masks, so the run is the same; a larger
    evaluation batch sums the same tokens."""
    cfg = tiny_config()
    other = dataclasses.replace(cfg, gradient_checkpointing=True, eval_batch_size=8)
    plain = run_experiment(cfg, "hybrid", seed=5, out_dir=tmp_path / "plain", progress=False)
    knobs = run_experiment(other, "hybrid", seed=5, out_dir=tmp_path / "knobs", progress=False)
    for row1, row2 in zip(plain["history"], knobs["history"], strict=True):
        assert row2["train_ce"] == pytest.approx(row1["train_ce"], rel=1e-5)
        assert row2["eval_loss"] == pytest.approx(row1["eval_loss"], rel=1e-5)
    assert knobs["metrics"]["A_after_stage2"]["acc"] == pytest.approx(plain["metrics"]["A_after_stage2"]["acc"])
