import math

import pytest
import torch

from hybrid_lora import build_model, domain_correlation_loss, flatten_lora_params, ordering_regularizer
from hybrid_lora.adapters import lora_factors
from hybrid_lora.losses import causal_lm_sums, order_weights, ordering_penalty

from conftest import randomize_lora


def slow_ordering(factors) -> float:
    """Eq. (2) without lambda, element by element in Python floats."""
    total = 0.0
    for a, b in factors:
        r = len(a)
        for i in range(1, r + 1):
            norm_a = math.sqrt(sum(x * x for x in a[i - 1]))
            norm_b = math.sqrt(sum(row[i - 1] ** 2 for row in b))
            total += (i / (r - 1) if r > 1 else 1.0) * norm_a * norm_b
    return total


def test_ordering_penalty_matches_slow_reference():
    g = torch.Generator().manual_seed(1)
    factors = [(torch.randn(r, 5, generator=g), torch.randn(7, r, generator=g)) for r in (4, 1, 3)]
    ref = slow_ordering([(a.tolist(), b.tolist()) for a, b in factors])
    assert ordering_penalty(factors).item() == pytest.approx(ref, rel=1e-6)


def test_order_weights_rank_one_is_finite():
    assert order_weights(1).tolist() == [1.0]
    assert order_weights(3).tolist() == [0.5, 1.0, 1.5]


def test_ordering_regularizer_on_model_is_lambda_times_reference_and_differentiable(cfg):
    model, _ = build_model(cfg)
    randomize_lora(model)
    factors = [(a.detach().tolist(), b.detach().tolist()) for _, a, b, _ in lora_factors(model)]
    reg = ordering_regularizer(model, 0.25)
    assert reg.item() == pytest.approx(0.25 * slow_ordering(factors), rel=1e-5)
    reg.backward()
    for _, a, b, _ in lora_factors(model):
        assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_dc_loss_matches_formula_zero_when_equal_gradient_when_different():
    g = torch.Generator().manual_seed(2)
    w_prev = torch.randn(50, generator=g, dtype=torch.float64)
    w_cur = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    loss = domain_correlation_loss(w_prev, w_cur, 0.3)
    p, c = w_prev.tolist(), w_cur.tolist()
    cos = sum(x * y for x, y in zip(p, c)) / math.sqrt(sum(x * x for x in p) * sum(y * y for y in c))
    assert loss.item() == pytest.approx(0.3 * (1 - cos), rel=1e-10)
    loss.backward()
    assert w_cur.grad.norm() > 1e-3
    same = w_prev.clone().requires_grad_(True)
    assert abs(domain_correlation_loss(w_prev, same, 0.3).item()) < 1e-12
    assert torch.autograd.gradcheck(lambda w: domain_correlation_loss(w_prev, w, 0.3), (w_cur,))


def test_dc_loss_is_accurate_in_fp32_for_a_large_adapter_barely_moved():
    """Regression: DC and `cos_to_stage1` used F.cosine_similarity, whose fp32 sums err by
    about 4e-4 at 7.4M elements (SmolLM2's r = 64 attention adapter): cosines above 1 in
    history.json, and 1 - cos wrong by several times early in Stage 2. Reference: float64."""
    from hybrid_lora.losses import cosine_distance, dc_per_module

    g = torch.Generator().manual_seed(0)
    w_prev = torch.randn(7_372_800, generator=g) * 0.01
    for step in (1e-4, 1e-2, 1.0):  # 1 - cos about 5e-9, 5e-5, 0.29
        w_cur = w_prev + step * 0.01 * torch.randn(w_prev.numel(), generator=g)
        p, c = w_prev.double(), w_cur.double()
        ref = 1 - (p @ c / (p.norm() * c.norm())).item()
        assert domain_correlation_loss(w_prev, w_cur, 1.0).item() == pytest.approx(ref, rel=2e-3)
    assert cosine_distance(torch.zeros(3), torch.ones(3)).item() == 1.0  # cos of a zero vector: 0
    halves = [(w_prev[:8].view(2, 4), w_prev[8:16].view(4, 2))]  # one module, as [A, B]
    assert dc_per_module(halves, [torch.ones(16)], 0.5).item() == pytest.approx(
        0.5 * (1 - (w_prev[:16].double().sum() / (w_prev[:16].double().norm() * 4))).item(), rel=1e-5)


def test_dc_loss_rejects_length_mismatch():
    with pytest.raises(ValueError, match="w_prev has 4 elements, w_cur has 3"):
        domain_correlation_loss(torch.ones(4), torch.ones(3), 0.1)


def test_defect1_dc_loss_on_live_model_weights_has_a_gradient(cfg):
    """The original flattened detached CPU copies, so DC never reached the LoRA weights."""
    model, _ = build_model(cfg)
    randomize_lora(model, seed=0)
    w_prev = flatten_lora_params(model, detach=True).clone()
    randomize_lora(model, seed=1)
    w_cur = flatten_lora_params(model)
    assert w_cur.requires_grad
    domain_correlation_loss(w_prev, w_cur, 0.1).backward()
    grads = [p.grad for _, a, b, _ in lora_factors(model) for p in (a, b)]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_causal_lm_sums_counts_shifted_labelled_tokens():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = 5.0  # position 0 predicts label[1] = 2 -> hit
    labels = torch.tensor([[1, 2, 1, -100]])  # position 1 (all-zero logits, argmax 0) misses
    ce, n, hits = causal_lm_sums(logits, labels)
    assert n.item() == 2 and hits.item() == 1
    expected = -math.log(math.exp(5) / (math.exp(5) + 2)) + math.log(3)
    assert ce.item() == pytest.approx(expected, rel=1e-6)
