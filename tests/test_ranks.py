"""Rank flexibility: DyLoRA nested training, slicing conventions, SVD truncation, the rank sweep."""
import copy
import dataclasses
import math

import pytest
import torch

from hybrid_lora.adapters import ADAPTER, build_model, lora_factors, rebuild_model_for_new_rank
from hybrid_lora.data import make_loaders
from hybrid_lora.evaluate import evaluate_loss_and_token_acc
from hybrid_lora.grid import grid
from hybrid_lora.nested import nested_training, rank_distribution
from hybrid_lora.config import ExperimentConfig
from hybrid_lora.ranks import cut_model_to_rank, lora_svd, rank_sweep, svd_truncate_factors
from hybrid_lora.results import read_json, run_dir
from hybrid_lora.analysis.sweep_results import gain_share, rank_auc, sweep_aucs
from hybrid_lora.runs import run_experiment
from hybrid_lora.train import make_optimizer

from conftest import randomize_lora, tiny_config

R = 8


def batch(cfg, n=3, seed=0):
    return torch.randint(1, 257, (n, cfg.max_length), generator=torch.Generator().manual_seed(seed))


def copy_first(src, dst, k):
    with torch.no_grad():
        for (_, a, b, _), (_, a2, b2, _) in zip(lora_factors(src), lora_factors(dst)):
            a2.copy_(a[:k])
            b2.copy_(b[:, :k])


@pytest.mark.parametrize("b", [1, 3, 8])
def test_nested_forward_at_rank_b_is_a_rank_b_lora_with_scaling_alpha_over_b(cfg, b):
    model, _ = build_model(cfg)
    randomize_lora(model)
    model.eval()  # no dropout: compare the deterministic maps
    reference, _ = build_model(cfg, r=b)  # PEFT: same lora_alpha, so scaling alpha/b
    assert lora_factors(reference)[0][3] == pytest.approx(cfg.lora_alpha / b)
    copy_first(model, reference, b)
    reference.eval()
    x = batch(cfg)
    with torch.no_grad(), nested_training(model, cfg) as nest:
        nest.begin(b)
        got = model(input_ids=x).logits
        nest.full()
        full = model(input_ids=x).logits
    torch.testing.assert_close(got, reference(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(full, model(input_ids=x).logits)  # hooks gone, full rank unchanged
    if b < R:
        assert not torch.allclose(got, full, atol=1e-3)


def grads_by_component(model):
    """Per LoRA module: which components (A rows, B columns) got a non-zero gradient."""
    return [((a.grad.abs().sum(1) > 0).tolist(), (b.grad.abs().sum(0) > 0).tolist())
            for _, a, b, _ in lora_factors(model)]


@pytest.mark.parametrize("frozen, b, expected", [
    (True, 5, [j == 4 for j in range(R)]),   # only component b (1-based) learns
    (False, 5, [j < 5 for j in range(R)]),   # components 1..b learn
])
def test_gradient_reaches_only_the_components_being_updated(cfg, frozen, b, expected):
    cfg = tiny_config(dylora_frozen=frozen)
    model, _ = build_model(cfg)
    randomize_lora(model)
    x = batch(cfg)
    with nested_training(model, cfg) as nest:
        nest.begin(b)
        model(input_ids=x, labels=x).loss.backward()
    for rows, cols in grads_by_component(model):
        assert rows == expected and cols == expected


@pytest.mark.parametrize("frozen", [False, True])
def test_adam_moves_nothing_outside_the_update_set(frozen):
    """AdamW's momentum and weight decay would move components that got no gradient this step."""
    cfg = tiny_config(dylora_frozen=frozen)
    model, _ = build_model(cfg)
    randomize_lora(model)
    opt = make_optimizer(model, cfg)
    x = batch(cfg)
    with nested_training(model, cfg) as nest:
        for b in (8, 3):  # the first step gives every component momentum
            before = [(a.detach().clone(), bb.detach().clone()) for _, a, bb, _ in lora_factors(model)]
            nest.begin(b)
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            nest.end()
        updated = [j == 2 for j in range(R)] if frozen else [j < 3 for j in range(R)]
        for (_, a, bb, _), (a0, b0) in zip(lora_factors(model), before):
            assert [not torch.equal(a[j], a0[j]) for j in range(R)] == updated
            assert [not torch.equal(bb[:, j], b0[:, j]) for j in range(R)] == updated


def test_rank_distributions():
    cfg = tiny_config(dylora_r_min=2)
    p = rank_distribution(cfg, 8)
    assert p[0] == 0 and torch.allclose(p[1:], torch.full((7,), 1 / 7, dtype=torch.float64))
    g = rank_distribution(tiny_config(dylora_r_min=2, dylora_distribution="geometric", dylora_p=0.3), 8)
    raw = [0.0] + [0.3 * 0.7 ** (b - 2) for b in range(2, 9)]
    assert g.tolist() == pytest.approx([w / sum(raw) for w in raw])
    # "ranks": uniform over the evaluated ranks at or below r (and r itself), from dylora_r_min
    e = rank_distribution(tiny_config(dylora_distribution="ranks", sweep_ranks=(1, 2, 4, 16)), 8)
    assert e.tolist() == [0.25, 0.25, 0, 0.25, 0, 0, 0, 0.25]
    e = rank_distribution(tiny_config(dylora_distribution="ranks", sweep_ranks=(1, 2, 4), dylora_r_min=3,
                                      rank_schedule=(8, 8, 8)), 8)
    assert e.tolist() == [0, 0, 0, 0.5, 0, 0, 0, 0.5]


def test_lora_svd_matches_the_full_matrix_svd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 20, generator=g), torch.randn(30, 6, generator=g)
    u, s, vh = lora_svd(a, b)
    full = torch.linalg.svdvals((b @ a).double())  # the slow reference: SVD of the 30 x 20 matrix
    torch.testing.assert_close(s.double(), full[:6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, b @ a, atol=1e-4, rtol=1e-5)
    a_full, b_full = svd_truncate_factors(a, b, 6)  # full rank reproduces delta W
    torch.testing.assert_close(b_full @ a_full, b @ a, atol=1e-4, rtol=1e-5)
    for k in (1, 3, 5):
        a_k, b_k = svd_truncate_factors(a, b, k)
        err = (b @ a - b_k @ a_k).double()
        assert torch.linalg.matrix_norm(err).item() == pytest.approx(full[k:6].square().sum().sqrt().item(), rel=1e-4)
        assert torch.linalg.matrix_norm(err, ord=2).item() == pytest.approx(full[k].item(), rel=1e-4)
        assert torch.count_nonzero(a_k[k:]) == 0 and torch.count_nonzero(b_k[:, k:]) == 0


def test_svd_truncation_agrees_with_peft_svd_conversion(cfg):
    import peft
    from packaging.version import Version

    model, _ = build_model(cfg)
    randomize_lora(model)
    k = 3
    # With one adapter PEFT silently switches to a linear merge and ignores svd_rank; the same
    # adapter twice at weight 0.5 gives its SVD of delta W. PEFT before 0.21 (0.20 is Colab's)
    # multiplies each weight by the adapter's scaling and then by get_delta_weight, which holds
    # the scaling already: its merge is `scaling` times the rank-k SVD of delta W (fixed in 0.21.0,
    # "get_delta_weight applies the scaling"). Ours is the SVD of delta W on both.
    twice = Version(peft.__version__) < Version("0.21")
    model.add_weighted_adapter([ADAPTER, ADAPTER], [0.5, 0.5], "svd3", combination_type="svd", svd_rank=k)
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "svd3" in mod.lora_A:
            a, b = mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight
            a_k, b_k = svd_truncate_factors(a.detach(), b.detach(), k)
            ours = mod.scaling[ADAPTER] * (b_k @ a_k)  # [out, in]
            u, s, vh = torch.linalg.svd(mod.scaling[ADAPTER] * (b @ a).detach())  # Eckart-Young reference
            torch.testing.assert_close(ours, u[:, :k] * s[:k] @ vh[:k], atol=1e-4, rtol=1e-4)
            peft_merge = mod.get_delta_weight("svd3").T if mod.fan_in_fan_out else mod.get_delta_weight("svd3")
            expected = ours * mod.scaling[ADAPTER] if twice else ours
            assert mod.scaling[ADAPTER] != 1.0  # so the two PEFT behaviours differ here
            torch.testing.assert_close(expected, peft_merge.detach(), atol=1e-4, rtol=1e-4)
            assert torch.linalg.matrix_rank(peft_merge.detach()) == k


@pytest.fixture
def trained(cfg):
    model, tok = build_model(cfg)
    randomize_lora(model, scale=0.3)
    return model, make_loaders(cfg, tok, "imdb", seed=0)[1]


def test_sweep_at_the_adapters_own_rank_equals_ordinary_evaluation(trained):
    model, loader = trained
    ev = evaluate_loss_and_token_acc(model, loader)
    for kind, scaling in (("slice", "preserve"), ("slice", "dylora"), ("svd", "preserve")):
        point = rank_sweep(model, loader, [R], kind, scaling)[0]
        if kind == "slice":
            assert (point["loss"], point["acc"]) == (ev["loss"], ev["acc"])
        else:  # rotated factors: same delta W up to float rounding
            assert point["loss"] == pytest.approx(ev["loss"], abs=1e-5)


@pytest.mark.parametrize("scaling, rebuild", [("preserve", "preserve"), ("dylora", "peft")])
def test_slice_sweep_equals_a_rebuilt_lower_rank_model(cfg, trained, scaling, rebuild):
    model, loader = trained
    points = rank_sweep(model, loader, [1, 4, 16], "slice", scaling)
    assert [p["rank"] for p in points] == [1, 4]  # 16 is above the adapter's rank
    for p in points:
        cut = rebuild_model_for_new_rank(copy.deepcopy(model), p["rank"], cfg, rebuild)
        ev = evaluate_loss_and_token_acc(cut, loader)
        assert p["loss"] == pytest.approx(ev["loss"], abs=1e-6) and p["acc"] == pytest.approx(ev["acc"], abs=1e-9)
    assert evaluate_loss_and_token_acc(model, loader)["loss"] != points[0]["loss"]


def test_defect4_rank_auc_is_the_share_of_the_gain_kept_on_a_common_axis():
    """Review defect 4: normalised by full-rank accuracy, an adapter that keeps nothing of
    its gain scored about 0.89. Now 1 = every cut keeps all the gain, 0 = none does."""
    # base loss 5.0, full adapter (rank 8) 4.0: a cut at 4.5 keeps half of the gain
    assert gain_share(4.5, 5.0, 4.0, "loss") == pytest.approx(0.5)
    assert gain_share(0.3, 0.2, 0.4, "acc") == pytest.approx(0.5)
    assert math.isnan(gain_share(4.5, 5.0, 5.0, "loss"))
    # keeps everything at every rank: 1
    assert rank_auc({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}, own_rank=8, r_min=1, r_max=8) == pytest.approx(1.0)
    # keeps nothing below its own rank 8 (axis log2 0..3): trapezoid (0 + 1)/2 over the last unit
    assert rank_auc({1: 0.0, 2: 0.0, 4: 0.0, 8: 1.0}, own_rank=8, r_min=1, r_max=8) == pytest.approx(0.5 / 3)
    # the same cuts, the adapter at rank 64 on the axis to 64: (0 ... 0 at 1..32, 1 at 64) -> 0.5 / 6
    zeros = {1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0, 16: 0.0, 32: 0.0, 64: 1.0}
    assert rank_auc(zeros, own_rank=64, r_min=1, r_max=64) == pytest.approx(0.5 / 6)
    # a rank-2 adapter on the common axis to 8: used whole from rank 2 up ->
    # (0.5 + 1)/2 over [0, 1], then 1 over [1, 3]: (0.75 + 2) / 3
    assert rank_auc({1: 0.5, 2: 1.0}, own_rank=2, r_min=1, r_max=8) == pytest.approx(2.75 / 3)
    # hand numbers: shares 0.2, 0.6 at ranks 1, 2 of a rank-4 adapter (axis 0..2):
    # (0.2 + 0.6)/2 + (0.6 + 1)/2 = 1.2, / 2
    assert rank_auc({1: 0.2, 2: 0.6, 4: 1.0}, own_rank=4, r_min=1, r_max=4) == pytest.approx(0.6)
    assert math.isnan(rank_auc({1: math.nan, 4: 1.0}, own_rank=4, r_min=1, r_max=4))
    # from sweep rows, in loss and accuracy
    rows = [{"adapter": "stage1", "adapter_rank": 4, "domain": "A", "kind": "slice", "rank": k,
             "loss": loss, "acc": acc} for k, loss, acc in ((1, 4.8, 0.12), (2, 4.4, 0.16), (4, 4.0, 0.2))]
    aucs = sweep_aucs(rows, {"A": {"loss": 5.0, "acc": 0.1}, "B": {"loss": 5.0, "acc": 0.1}},
                      {"A": {"loss": 4.0, "acc": 0.2}, "B": {"loss": 4.0, "acc": 0.2}}, r_max=4)
    assert aucs["rank_auc_loss_stage1_A"] == pytest.approx(0.6)
    assert aucs["rank_auc_acc_stage1_A"] == pytest.approx(0.6)
    assert math.isnan(aucs["rank_auc_loss_final_B"])  # no rows for it


def test_nested_and_small_methods_run_through_the_pipeline(tmp_path):
    cfg = tiny_config(sweep_ranks=(1, 2, 4, 8))
    nested = run_experiment(cfg, "dylora_nested", 42, tmp_path, progress=False)
    small = run_experiment(cfg, "lora_small", 42, tmp_path, progress=False)
    assert [h["rank"] for h in nested["history"]] == [8, 8, 4, 2]
    assert [h["rank"] for h in small["history"]] == [2, 2, 2, 2]
    assert small["history"][0]["trainable_params"] == nested["history"][-1]["trainable_params"]
    sweep = read_json(run_dir(tmp_path, "dylora_nested", 42) / "sweep.json")
    slices = {(r["adapter"], r["domain"], r["rank"]) for r in sweep if r["kind"] == "slice"}
    assert slices == {("stage1", d, k) for d in "AB" for k in (1, 2, 4, 8)} | \
        {("final", d, k) for d in "AB" for k in (1, 2)}
    assert {r["scaling"] for r in sweep if r["kind"] == "slice"} == {"dylora"}
    assert 0 < nested["metrics"]["rank_auc_loss_stage1_A"] <= 1.5
    final_b = [r for r in sweep if (r["adapter"], r["domain"], r["kind"], r["rank"]) == ("final", "B", "slice", 2)]
    assert final_b[0]["acc"] == nested["metrics"]["B_after_stage2"]["acc"]  # own rank = the ordinary eval


def delta_ws(model):
    """Each module's scaling * B A in float64."""
    return [(s * b.double() @ a.double()).detach() for _, a, b, s in lora_factors(model)]


@pytest.mark.parametrize("cut", ["svd", "svd_a_scale"])
@pytest.mark.parametrize("scaling", ["preserve", "peft"])
def test_svd_schedule_cut_keeps_each_modules_best_rank_k_delta_w(cfg, scaling, cut):
    model, _ = build_model(cfg)
    randomize_lora(model)
    before, k = delta_ws(model), 3
    a_rms = [a.double().square().sum(1).mean().sqrt().item() for _, a, _, _ in lora_factors(model)]
    cut_model = cut_model_to_rank(copy.deepcopy(model), k, cut, scaling)
    svd_cut = delta_ws(cut_model)
    for (_, a, b, _), rms, dw in zip(lora_factors(cut_model), a_rms, before):
        norms = a.double().norm(dim=1)  # balanced: sqrt of the singular values; else A's old scale
        want = torch.linalg.svdvals(dw / lora_factors(model)[0][3])[:k].sqrt() if cut == "svd" else torch.full((k,), rms)
        torch.testing.assert_close(norms, want.double(), atol=1e-5, rtol=1e-5)
    slice_cut = delta_ws(cut_model_to_rank(copy.deepcopy(model), k, "slice", scaling))
    grow = 1.0 if scaling == "preserve" else R / k  # "peft" keeps alpha: alpha/r grows by r/k
    for dw, got, sliced in zip(before, svd_cut, slice_cut):
        u, s, vh = torch.linalg.svd(dw)  # Eckart-Young reference, from the full matrix
        torch.testing.assert_close(got, grow * (u[:, :k] * s[:k] @ vh[:k]), atol=1e-5, rtol=1e-5)
        assert torch.linalg.matrix_rank(sliced) == k
        # the slice keeps a rank-k part too, but not the best one
        assert torch.linalg.matrix_norm(dw - sliced / grow) > torch.linalg.matrix_norm(dw - got / grow) * 1.05
    with pytest.raises(ValueError, match="cut='svdd'"):
        cut_model_to_rank(model, k, "svdd")


def test_svd_schedule_cut_shares_stage1_and_changes_only_stage2(tmp_path):
    cfg = tiny_config(sweep_ranks=(), sweep_kinds=())
    sliced = run_experiment(cfg, "dylora", 42, tmp_path, progress=False)
    svd = run_experiment(dataclasses.replace(cfg, rebuild_cut="svd"), "dylora", 42, tmp_path,
                         progress=False, name="dylora_svdcut")
    assert read_json(run_dir(tmp_path, "dylora_svdcut", 42) / "stage1.json")["copied_from"] == "dylora/seed42"
    assert [h["rank"] for h in svd["history"]] == [8, 8, 4, 2]
    assert svd["history"][0] == sliced["history"][0]  # Stage 1: copied
    assert svd["history"][1]["eval_loss"] == sliced["history"][1]["eval_loss"]  # the uncut first Stage-2 epoch
    assert svd["history"][2]["eval_loss"] != sliced["history"][2]["eval_loss"]
    assert svd["config"]["rebuild_cut"] == "svd"
    # the factors are rotated from the first cut on: their cosine to Stage 1's means nothing
    assert [h["cos_to_stage1"] is None for h in svd["history"]] == [True, False, True, True]
    assert all(h["cos_to_stage1"] is not None for h in sliced["history"][1:])


def test_svd_schedule_cut_refuses_a_dc_that_compares_factors(tmp_path):
    cfg = tiny_config(methods=("lora", "hybrid"), rebuild_cut="svd")
    with pytest.raises(ValueError, match=r"rebuild_cut='svd' with method 'hybrid'.*dc_variant='delta_w'"):
        grid(cfg)  # before any run of the call starts
    with pytest.raises(ValueError, match=r"rebuild_cut='svd' with method 'hybrid'"):
        run_experiment(cfg, "hybrid", 42, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written
    assert [m for _, m, *_ in grid(dataclasses.replace(cfg, dc_variant="delta_w"))] == ["lora", "hybrid"]
    with pytest.raises(ValueError, match="rebuild_cut='top'"):
        ExperimentConfig(rebuild_cut="top")


def test_a_stage_after_the_svd_cuts_reports_its_cosine_again(tmp_path):
    """Stage 3 starts at the schedule's last rank and cuts nothing: its factors are in the basis of
    Stage 2's, so its cosine to them is reported (regression: any rank below r hid it)."""
    cfg = tiny_config(domains=("imdb", "code", "yelp"), epochs_stage2=2, rank_schedule=(8, 4), rebuild_cut="svd",
                      sweep_ranks=(), sweep_kinds=())
    run = run_experiment(cfg, "dylora", 42, tmp_path, progress=False)
    assert [(h["stage"], h["rank"], h["cos_to_stage1"] is None) for h in run["history"]] == \
        [(1, 8, True), (2, 8, False), (2, 4, True), (3, 4, False), (3, 4, False)]
