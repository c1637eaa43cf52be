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


@pytest.mark.parametrize("weighting", ["mean", "sum"])
def test_forward_is_the_mean_or_sum_of_the_sub_adapters_in_every_module(weighting):
    """Each adapted module computes base(x) + (1/|K|) sum_k (alpha/k) B[:, :k] A[:k] x ("mean");
    with "sum", base(x) + sum_k s B[:, :k] A[:k] x at the adapter's own scaling s = alpha / r,
    whose cuts keep s ("preserve"), so the rank-k cut is the rank-k sub-adapter trained."""
    from hybrid_lora.methods import get_method

    cfg = tiny_config(lora_dropout=0.0, matryoshka_weighting=weighting)
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    model.eval()
    ks = matryoshka_ranks(cfg, cfg.r)
    x = torch.randn(3, cfg.tiny_n_embd, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), nested_training(model, cfg, "matryoshka") as nest:
        nest.begin(nest.next_rank())
        for name, a, b, s in lora_factors(model):
            mod = model.get_submodule(name)
            if weighting == "mean":
                lora = sum(cfg.lora_alpha / k * x @ a[:k].T @ b[:, :k].T for k in ks) / len(ks)  # [3, out]
            else:
                lora = sum(s * x @ a[:k].T @ b[:, :k].T for k in ks)
            torch.testing.assert_close(mod(x), mod.base_layer(x) + lora, atol=1e-5, rtol=1e-5)
        nest.full()  # evaluation: the uncut adapter at its own scaling alpha / r
        for name, a, b, s in lora_factors(model):
            mod = model.get_submodule(name)
            torch.testing.assert_close(mod(x), mod.base_layer(x) + s * x @ a.T @ b.T, atol=1e-5, rtol=1e-5)
    assert get_method("matryoshka").cut_scaling(cfg) == ("dylora" if weighting == "mean" else "preserve")


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
    assert matryoshka_weights(cfg, 8, cfg.lora_alpha, "preserve").tolist() == [4, 3, 2, 2, 1, 1, 1, 1]
    custom = tiny_config(matryoshka_weighting="sum", matryoshka_ranks=(2, 8))
    assert matryoshka_weights(custom, 8, custom.lora_alpha, "preserve").tolist() == [2, 2, 1, 1, 1, 1, 1, 1]


def test_a_sum_weighted_run_is_swept_at_its_own_scaling(tmp_path):
    cfg = tiny_config(matryoshka_weighting="sum", sweep_ranks=(1, 2), sweep_kinds=("slice",))
    run_experiment(cfg, "matryoshka", 42, tmp_path, progress=False)
    rows = json.loads((tmp_path / "matryoshka" / "seed42" / "sweep.json").read_text())
    assert {r["scaling"] for r in rows} == {"preserve"}


def test_a_bad_weighting_is_named():
    with pytest.raises(ValueError, match="matryoshka_weighting='max': must be one of \\('mean', 'sum'\\)"):
        tiny_config(matryoshka_weighting="max")


def test_rotation_into_the_svd_basis_keeps_the_function_and_orders_the_components():
    from hybrid_lora.ranks import rotate_to_svd

    cfg = tiny_config(lora_dropout=0.0)
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    model.eval()
    ids = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        deltas = [s * b @ a for _, a, b, s in lora_factors(model)]
        rotate_to_svd(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    for (_, a, b, s), delta in zip(lora_factors(model), deltas):
        torch.testing.assert_close(s * b @ a, delta, atol=1e-5, rtol=1e-5)
        sv = torch.linalg.svdvals(delta.double())[:a.shape[0]] / s  # of B A
        norms = a.norm(dim=1).double() * b.norm(dim=0).double()  # ||A_i|| ||B_i|| = sigma_i
        torch.testing.assert_close(norms, sv, atol=1e-4, rtol=1e-4)
        gram = (a @ a.T).double()
        torch.testing.assert_close(gram, torch.diag(torch.diag(gram)), atol=1e-5, rtol=0)


def test_preserve_weights_are_sub_adapters_at_the_adapters_own_scaling():
    cfg = tiny_config()
    assert matryoshka_weights(cfg, 8, cfg.lora_alpha, "preserve").tolist() == pytest.approx(
        [1, 0.75, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25])


def test_lora_svd_nested_is_plain_lora_then_rotated_and_nested(tmp_path, monkeypatch):
    """Stage 1 of 2 epochs x 4 steps, svd_nest_fraction 0.5: epoch 1 is plain LoRA's exactly; the
    rotation comes before step 4 (0-based) and the nested weighting acts on steps 4..7 only."""
    from hybrid_lora import train as train_mod
    from hybrid_lora.methods import get_method

    cfg = tiny_config(epochs_stage1=2, svd_nest_fraction=0.5, sweep_ranks=(1, 2), sweep_kinds=("slice", "svd"),
                      rank_schedule=(8, 8, 8))
    seen, real = [], train_mod.rotate_to_svd
    monkeypatch.setattr(train_mod, "rotate_to_svd", lambda model: seen.append("rotate") or real(model))
    begin = train_mod.nested_training

    def spy(model, cfg_, mode, scaling=None):
        ctx = begin(model, cfg_, mode, scaling)

        class Wrap:
            def __enter__(self):
                self.step = ctx.__enter__()
                if self.step is not None:
                    real_begin = self.step.begin
                    self.step.begin = lambda b=None: seen.append("nested") or real_begin(b)
                return self.step

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)
        return Wrap()

    monkeypatch.setattr(train_mod, "nested_training", spy)
    nested = run_experiment(cfg, "lora_svd_nested", 42, tmp_path, progress=False)
    monkeypatch.undo()
    plain = run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    assert seen[:5] == ["rotate", "nested", "nested", "nested", "nested"]  # Stage 1: steps 4..7
    assert nested["history"][0]["train_ce"] == plain["history"][0]["train_ce"]  # epoch 1: plain LoRA
    assert nested["history"][1]["train_ce"] != plain["history"][1]["train_ce"]
    # Stage 2 (3 epochs x 4 steps) rotates at step 6, in epoch 2: from then on the factors'
    # cosine to Stage 1's means nothing (regression: it was reported)
    assert [h["cos_to_stage1"] is None for h in nested["history"]] == [True, True, False, True, True]
    assert [h["cos_to_stage1"] is None for h in plain["history"]] == [True, True, False, False, False]
    rows = json.loads((tmp_path / "lora_svd_nested" / "seed42" / "sweep.json").read_text())
    assert {r["scaling"] for r in rows} == {"preserve"}
    assert get_method("lora_svd_nested").stage1_signature() != get_method("matryoshka").stage1_signature()
    assert get_method("lora_svd_nested").cut_scaling(cfg) == "preserve"



@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_svd_nest_mode_dylora_trains_at_each_step_the_cut_the_sweep_evaluates(k):
    """svd_nest_mode="dylora": a nested step of lora_svd_nested at rank b runs every module as
    base + (alpha/r) B[:, :b] A[:b], the adapter's own scaling, which is the cut to rank b that
    the sweep evaluates (rebuild at "preserve"); the Matryoshka mode's step is no single cut."""
    from hybrid_lora.methods import get_method

    cfg = tiny_config(lora_dropout=0.0, svd_nest_mode="dylora")
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    model.eval()
    cut = rebuild_model_for_new_rank(copy.deepcopy(model), k, cfg, scaling="preserve").eval()
    method = get_method("lora_svd_nested")
    assert (method.nest_mode(cfg), method.cut_scaling(cfg)) == ("dylora", "preserve")
    x = torch.randn(3, cfg.tiny_n_embd, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), nested_training(model, cfg, method.nest_mode(cfg), method.cut_scaling(cfg)) as nest:
        nest.begin(k)
        for (name, a, b, s), (_, _, _, s_k) in zip(lora_factors(model), lora_factors(cut)):
            assert s_k == pytest.approx(s)  # a cut at "preserve" keeps alpha / r
            expected = model.get_submodule(name).base_layer(x) + s * x @ a[:k].T @ b[:, :k].T
            torch.testing.assert_close(model.get_submodule(name)(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cut.get_submodule(name)(x), expected, atol=1e-5, rtol=1e-5)
    assert get_method("lora_svd_nested").nest_mode(tiny_config()) == "matryoshka"  # the default
    with pytest.raises(ValueError, match="svd_nest_mode='both': must be one of \\('matryoshka', 'dylora'\\)"):
        tiny_config(svd_nest_mode="both")


def test_lora_svd_nested_in_dylora_mode_draws_its_ranks_only_in_the_nested_steps(tmp_path, monkeypatch):
    """The training loop nests the way svd_nest_mode says: with "dylora" and b drawn from the
    evaluated ranks, the last half of the steps each train one cut b in {1, 2, 8} (r = 8)."""
    from hybrid_lora import nested as nested_mod

    cfg = tiny_config(domains=("code",), epochs_stage1=2, svd_nest_fraction=0.5, sweep_ranks=(1, 2),
                      sweep_kinds=("slice",), svd_nest_mode="dylora", dylora_distribution="ranks")
    drawn, real = [], nested_mod.NestedStep.begin
    monkeypatch.setattr(nested_mod.NestedStep, "begin", lambda self, b: drawn.append(b) or real(self, b))
    run_experiment(cfg, "lora_svd_nested", 42, tmp_path, progress=False)
    assert len(drawn) == 4 and set(drawn) <= {1, 2, 8}  # steps 4..7 of 8

def test_lora_svd_nested_resumes_exactly_after_its_rotation(tmp_path, monkeypatch):
    from test_resume import Interrupt, count_training_steps, finished_files

    cfg = tiny_config(epochs_stage1=2, svd_nest_fraction=0.5, rank_schedule=(8, 8, 8), checkpoint_every=1,
                      sweep_ranks=(2,))
    run_experiment(cfg, "lora_svd_nested", 42, tmp_path / "whole", progress=False)
    count_training_steps(monkeypatch, stop_at=7)  # after the rotation (step 4), before step 6 ends
    with pytest.raises(Interrupt):
        run_experiment(cfg, "lora_svd_nested", 42, tmp_path / "cut", progress=False)
    count_training_steps(monkeypatch)
    assert run_experiment(cfg, "lora_svd_nested", 42, tmp_path / "cut", progress=False)["complete"]
    assert finished_files(tmp_path / "cut", "lora_svd_nested") == finished_files(tmp_path / "whole", "lora_svd_nested")
