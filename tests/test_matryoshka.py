"""Matryoshka weighting (methods matryoshka, hybrid_matryoshka): one forward pass that trains the
mean of the rank-k sub-adapters, checked against hand-written references."""
import copy
import json

import pytest
import torch

from hybrid_lora import build_model, rebuild_model_for_new_rank, run_experiment
from hybrid_lora.adapters import lora_factors
from hybrid_lora.nested import matryoshka_ranks, matryoshka_weights, nested_training

from conftest import randomize_lora, tiny_config


def test_weights_against_a_slow_formula():
    cfg = tiny_config()  # r = 8, lora_alpha = 16
    assert matryoshka_ranks(cfg, 8) == [1, 2, 4, 8] and matryoshka_ranks(cfg, 6) == [1, 2, 4, 6]
    assert matryoshka_ranks(tiny_config(matryoshka_ranks=(2, 5)), 4) == [2, 4]
    for r in (8, 6, 1):
        ks = matryoshka_ranks(cfg, r)
        slow = [sum(16.0 / k for k in ks if k > i) / len(ks) / (16.0 / r) for i in range(r)]
        assert matryoshka_weights(cfg, r, 16.0).tolist() == pytest.approx(slow, rel=1e-6)
    with pytest.raises(ValueError, match="matryoshka_ranks.*from 1 to r=8"):
        tiny_config(matryoshka_ranks=(0, 4))


def test_forward_is_the_mean_of_the_sub_adapters_in_every_module():
    """Each adapted module computes base(x) + (1/|K|) sum_k (alpha/k) B[:, :k] A[:k] x."""
    cfg = tiny_config(lora_dropout=0.0)
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    model.eval()
    ks = matryoshka_ranks(cfg, cfg.r)
    x = torch.randn(3, cfg.tiny_n_embd, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), nested_training(model, cfg, "matryoshka") as nest:
        nest.begin(nest.next_rank())
        for name, a, b, _ in lora_factors(model):
            mod = model.get_submodule(name)
            mean = sum(cfg.lora_alpha / k * x @ a[:k].T @ b[:, :k].T for k in ks) / len(ks)  # [3, out]
            torch.testing.assert_close(mod(x), mod.base_layer(x) + mean, atol=1e-5, rtol=1e-5)
        nest.full()  # evaluation: the uncut adapter at its own scaling alpha / r
        for name, a, b, s in lora_factors(model):
            mod = model.get_submodule(name)
            torch.testing.assert_close(mod(x), mod.base_layer(x) + s * x @ a.T @ b.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_cut_to_rank_k_is_the_rank_k_sub_adapter_trained(k):
    """The sub-adapter a step trains (first k components at alpha/k) is what a cut gives."""
    cfg = tiny_config(lora_dropout=0.0)
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    cut = rebuild_model_for_new_rank(copy.deepcopy(model), k, cfg, scaling="peft").eval()
    x = torch.randn(3, cfg.tiny_n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for (name, a, b, _), (_, a_k, b_k, s_k) in zip(lora_factors(model), lora_factors(cut)):
            assert s_k == pytest.approx(cfg.lora_alpha / k)
            mod = cut.get_submodule(name)
            expected = mod.base_layer(x) + cfg.lora_alpha / k * x @ a[:k].T @ b[:, :k].T
            torch.testing.assert_close(mod(x), expected, atol=1e-5, rtol=1e-5)


def test_every_component_gets_a_gradient_in_every_step():
    cfg = tiny_config()
    model, _ = build_model(cfg)
    randomize_lora(model)
    x = torch.randint(1, 257, (2, cfg.max_length), generator=torch.Generator().manual_seed(0))
    with nested_training(model, cfg, "matryoshka") as nest:
        nest.begin(nest.next_rank())
        model(input_ids=x, labels=x).loss.backward()
    for _, a, b, _ in lora_factors(model):
        assert (a.grad.abs().sum(1) > 0).all() and (b.grad.abs().sum(0) > 0).all()


def test_matryoshka_methods_run_the_schedule_and_save_adapters_at_alpha_over_k(tmp_path):
    cfg = tiny_config()
    for method in ("matryoshka", "hybrid_matryoshka"):
        result = run_experiment(cfg, method, 42, tmp_path, progress=False)
        history = result["history"]
        assert [row["rank"] for row in history if row["stage"] == 2] == list(cfg.rank_schedule)
        assert all(row["train_order"] == 0.0 for row in history)  # Matryoshka replaces the ordering term
        assert all((row["train_dc"] > 0) == (method == "hybrid_matryoshka") for row in history[2:])
        saved = json.loads((tmp_path / method / "seed42" / "adapter_final" / "adapter_config.json").read_text())
        assert saved["r"] == cfg.rank_schedule[-1] and saved["lora_alpha"] == cfg.lora_alpha  # cut at alpha/k
        assert result["metrics"]["B_after_stage2"]["loss"] < result["metrics"]["B_base"]["loss"]
    lora = run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    matry = run_experiment(cfg, "matryoshka", 42, tmp_path, progress=False)
    assert matry["history"][0]["train_ce"] != lora["history"][0]["train_ce"]  # the weighting acts


def test_sum_weighting_is_the_reference_codes_diag_mask():
    """MatryoshkaLoRA's reference ("diag" mask, lora_scaling "none"): component i (0-based) carries
    the number of train ranks k with k > i; K = 1, 2, 4, 8 on r = 8."""
    cfg = tiny_config(matryoshka_weighting="sum")
    assert matryoshka_weights(cfg, 8, cfg.lora_alpha).tolist() == [4, 3, 2, 2, 1, 1, 1, 1]
    custom = tiny_config(matryoshka_weighting="sum", matryoshka_ranks=(2, 8))
    assert matryoshka_weights(custom, 8, custom.lora_alpha).tolist() == [2, 2, 1, 1, 1, 1, 1, 1]


def test_sum_weighting_trains_the_sum_of_sub_adapters_and_cuts_keep_the_scaling():
    """Each module computes base(x) + sum_k s B[:, :k] A[:k] x (s = alpha / r, the adapter's own);
    its cuts keep s ("preserve"), so the rank-k cut is the rank-k sub-adapter trained."""
    from hybrid_lora.methods import get_method

    cfg = tiny_config(lora_dropout=0.0, matryoshka_weighting="sum")
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    model.eval()
    ks = matryoshka_ranks(cfg, cfg.r)
    x = torch.randn(3, cfg.tiny_n_embd, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), nested_training(model, cfg, "matryoshka") as nest:
        nest.begin(nest.next_rank())
        for name, a, b, s in lora_factors(model):
            mod = model.get_submodule(name)
            total = sum(s * x @ a[:k].T @ b[:, :k].T for k in ks)
            torch.testing.assert_close(mod(x), mod.base_layer(x) + total, atol=1e-5, rtol=1e-5)
    assert get_method("matryoshka").cut_scaling(cfg) == "preserve"
    assert get_method("matryoshka").cut_scaling(tiny_config()) == "dylora"


def test_a_sum_weighted_run_is_swept_at_its_own_scaling(tmp_path):
    cfg = tiny_config(matryoshka_weighting="sum", sweep_ranks=(1, 2), sweep_kinds=("slice",))
    run_experiment(cfg, "matryoshka", 42, tmp_path, progress=False)
    rows = json.loads((tmp_path / "matryoshka" / "seed42" / "sweep.json").read_text())
    assert {r["scaling"] for r in rows} == {"preserve"}


def test_a_bad_weighting_is_named():
    with pytest.raises(ValueError, match="matryoshka_weighting='max': must be one of \\('mean', 'sum'\\)"):
        tiny_config(matryoshka_weighting="max")
