import copy

import pytest
import torch
from peft import get_peft_model

from hybrid_lora import (ExperimentConfig, build_model, count_trainable_params, domain_correlation_loss,
                         flatten_lora_params, load_adapter, rebuild_model_for_new_rank)
from hybrid_lora.adapters import (build_base_model, flatten_factors, lora_config, lora_factors,
                                  snapshot_factors)

from conftest import randomize_lora


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def ids(cfg, n=2, seed=0):
    return torch.randint(1, 257, (n, cfg.max_length), generator=torch.Generator().manual_seed(seed))


def test_flatten_layout_is_per_module_A_rows_then_B_columns(cfg):
    model, _ = build_model(cfg)
    randomize_lora(model)
    facs = lora_factors(model)
    assert [n.split("base_model.model.")[-1] for n, *_ in facs] == \
        [f"transformer.h.{i}.attn.c_attn" for i in range(cfg.tiny_n_layer)]
    k = 3
    manual = []
    for _, a, b, _ in facs:
        manual += [a[i, j].item() for i in range(k) for j in range(a.shape[1])]
        manual += [b[i, j].item() for i in range(b.shape[0]) for j in range(k)]
    assert flatten_lora_params(model, rank=k, detach=True).tolist() == manual
    assert flatten_lora_params(model).requires_grad
    assert not flatten_lora_params(model, detach=True).requires_grad


def zero_components_from(model, k):
    """A copy of `model` whose LoRA components k.. are zeroed (an independent way to truncate)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for _, a, b, _ in lora_factors(clone):
            a[k:] = 0
            b[:, k:] = 0
    return clone


@pytest.mark.parametrize("new_r", [8, 4, 1])
def test_preserve_rebuild_keeps_logits_of_truncated_model(cfg, new_r):
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    x = ids(cfg)
    expected = logits_of(zero_components_from(model, new_r), x)
    rebuilt = rebuild_model_for_new_rank(model, new_r, cfg, scaling="preserve")
    assert lora_factors(rebuilt)[0][1].shape[0] == new_r
    assert torch.allclose(logits_of(rebuilt, x), expected, atol=1e-5)
    assert count_trainable_params(rebuilt) == cfg.tiny_n_layer * new_r * (cfg.tiny_n_embd * 4)


def test_defect3_peft_scaling_amplifies_and_preserve_does_not(cfg):
    """Keeping lora_alpha fixed while r drops multiplies alpha/r, i.e. every kept component."""
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    old = lora_factors(model)[0][3]
    kept = rebuild_model_for_new_rank(copy.deepcopy(model), 2, cfg, scaling="preserve")
    drift = rebuild_model_for_new_rank(model, 2, cfg, scaling="peft")
    assert lora_factors(kept)[0][3] == pytest.approx(old)
    assert lora_factors(drift)[0][3] == pytest.approx(old * cfg.r / 2)
    x = ids(cfg)
    assert not torch.allclose(logits_of(drift, x), logits_of(kept, x), atol=1e-3)


def test_defect4_truncated_stage1_vector_lines_up_with_rebuilt_model(cfg):
    """After a cut, the Stage-1 vector must be cut per module, not as one flat prefix."""
    model, _ = build_model(cfg)
    randomize_lora(model)
    stage1 = snapshot_factors(model)
    rebuilt = rebuild_model_for_new_rank(model, 4, cfg)
    w_prev, w_cur = flatten_factors(stage1, rank=4), flatten_lora_params(rebuilt)
    assert torch.equal(w_prev, w_cur.detach())
    assert abs(domain_correlation_loss(w_prev, w_cur, 1.0).item()) < 1e-6
    naive_prefix = flatten_factors(stage1)[: w_cur.numel()]  # what the original compared
    assert domain_correlation_loss(naive_prefix, w_cur, 1.0).item() > 0.5


def test_base_build_is_identical_and_leaves_global_rng_alone(cfg):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = build_base_model(cfg)
    assert torch.equal(torch.rand(1), before)  # building a base consumed no global randomness
    second = build_base_model(cfg)
    for (n, p), (_, q) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("scaling", ["preserve", "peft"])
def test_rank_change_in_place_equals_a_fresh_model_built_at_the_new_rank(cfg, scaling):
    """The in-place cut (no reload of the base) against the rebuild it replaced: a fresh base
    with a rank-k LoRA whose alpha follows the scaling rule, holding the first k components."""
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    k, alpha = 3, cfg.lora_alpha * 3 / cfg.r if scaling == "preserve" else cfg.lora_alpha
    base_before = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    base = build_base_model(cfg)
    reference = get_peft_model(base, lora_config(cfg, base, r=k, lora_alpha=alpha))
    with torch.no_grad():
        for (_, a, b, _), (_, a_ref, b_ref, _) in zip(lora_factors(model), lora_factors(reference)):
            a_ref.copy_(a[:k])
            b_ref.copy_(b[:, :k])
    cut = rebuild_model_for_new_rank(model, k, cfg, scaling=scaling)
    assert cut is model
    x = ids(cfg)
    assert torch.equal(logits_of(cut, x), logits_of(reference, x))
    assert [s for *_, s in lora_factors(cut)] == [s for *_, s in lora_factors(reference)]
    assert cut.peft_config["default"].r == k and cut.peft_config["default"].lora_alpha == alpha
    for n, p in cut.named_parameters():  # the very same base tensors: nothing reloaded
        if "lora_" not in n:
            assert p is base_before[n], n
    assert count_trainable_params(cut) == count_trainable_params(reference)


def test_rebuild_rejects_bad_rank_and_scaling(cfg):
    model, _ = build_model(cfg)
    with pytest.raises(ValueError, match="new_r=9"):
        rebuild_model_for_new_rank(model, 9, cfg)
    with pytest.raises(ValueError, match="new_r=0"):
        rebuild_model_for_new_rank(model, 0, cfg)
    with pytest.raises(ValueError, match="scaling='double'"):
        rebuild_model_for_new_rank(model, 4, cfg, scaling="double")


def test_defect7_parameter_counts_of_gpt2_small_are_measured_from_the_model():
    """LoRA on GPT-2's c_attn: 12 layers x r x (768 in + 2304 out); not the ~0.3M once reported."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ExperimentConfig()
    for r, expected in ((64, 2_359_296), (16, 589_824)):
        with torch.device("meta"):  # full GPT-2 shapes without allocating weights
            base = GPT2LMHeadModel(GPT2Config())
            model = get_peft_model(base, lora_config(cfg, base, r=r))  # the config build_model uses
        assert count_trainable_params(model) == expected == 12 * r * (768 + 2304)
        assert sum(p.numel() for p in model.parameters()) - expected == 124_439_808


def test_save_pretrained_round_trip_reproduces_logits(cfg, tmp_path):
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_adapter(cfg, tmp_path / "adapter")
    x = ids(cfg, seed=3)
    assert torch.allclose(logits_of(loaded, x), logits_of(model, x), atol=1e-6)
