"""Continual-learning penalties, DC variants and metrics against slow, hand-written references."""
import math

import pytest
import torch

from hybrid_lora.adapters import flatten_factors
from hybrid_lora.losses import (dc_delta_w, dc_per_module, delta_w_l2, ewc_penalty, module_vectors,
                                   olora_penalty)
from hybrid_lora.losses import domain_correlation_loss
from hybrid_lora.analysis.stats import paired_bootstrap_ci
from hybrid_lora.results import cl_metrics


def factor_pairs(seed, ranks=(3, 2), d_in=7, d_out=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=g, dtype=torch.float64),
             torch.randn(d_out, r, generator=g, dtype=torch.float64)) for r in ranks]


def dc_global(factors, prev, lam):
    """The paper's DC as the pipeline computes it (`dc_variant="global"`)."""
    return domain_correlation_loss(flatten_factors(prev), flatten_factors(factors), lam)


def hand_cos_term(x, y, lam):
    """lam * (1 - x.y / (|x| |y|)) written out, as an independent reference."""
    return lam * (1 - (x * y).sum() / ((x * x).sum() * (y * y).sum()).sqrt())


def reparametrise(factors, seed):
    """B A -> (B G)(G^-1 A) with a random invertible G per module."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for a, b in factors:
        G = torch.randn(a.shape[0], a.shape[0], generator=g, dtype=torch.float64) + 3 * torch.eye(a.shape[0])
        out.append((torch.linalg.solve(G, a), b @ G))
    return out


def test_delta_w_l2_equals_the_full_matrix_norm_and_ignores_reparametrisation():
    cur, prev = factor_pairs(0), factor_pairs(1, ranks=(4, 1))  # ranks may differ across stages
    scalings = [0.5, 2.0]
    slow = sum(float(((s * b @ a) - (s * b0 @ a0)).square().sum())
               for (a, b), (a0, b0), s in zip(cur, prev, scalings))
    assert float(delta_w_l2(cur, prev, scalings, scalings)) == pytest.approx(slow, rel=1e-10)
    assert float(delta_w_l2(reparametrise(cur, 2), prev, scalings, scalings)) == pytest.approx(slow, rel=1e-8)
    # the naive L2 on A and B separately is not invariant (the line below compares cur with itself)
    naive = lambda f: sum(float((a - a0).square().sum() + (b - b0).square().sum())  # noqa: E731
                          for (a, b), (a0, b0) in zip(f, cur))
    assert naive(reparametrise(cur, 2)) > 1e-3 and naive(cur) == 0


def test_defect3_delta_w_l2_takes_each_adapters_own_scaling():
    """Review defect 3: ||s B A - s0 B0 A0||_F^2 with s != s0 (another rank or alpha in the
    previous stage); the old code multiplied B0 A0 by the new adapter's scaling."""
    cur, prev = factor_pairs(0, ranks=(2, 3)), factor_pairs(1, ranks=(4, 1))
    scalings, prev_scalings = [2.0, 0.25], [0.5, 3.0]
    slow = sum(float(((s * b @ a) - (s0 * b0 @ a0)).square().sum())
               for (a, b), (a0, b0), s, s0 in zip(cur, prev, scalings, prev_scalings))
    assert float(delta_w_l2(cur, prev, scalings, prev_scalings)) == pytest.approx(slow, rel=1e-10)
    one_scaling = sum(float(((s * b @ a) - (s * b0 @ a0)).square().sum())
                      for (a, b), (a0, b0), s in zip(cur, prev, scalings))
    assert abs(slow - one_scaling) > 1.0  # the old formula is measurably wrong here


def test_ewc_and_olora_against_loops():
    g = torch.Generator().manual_seed(3)
    theta, prev, fisher = (torch.randn(20, generator=g, dtype=torch.float64) for _ in range(3))
    fisher = fisher.abs()
    assert float(ewc_penalty(theta, prev, fisher)) == pytest.approx(
        sum(float(fisher[i]) * (float(theta[i]) - float(prev[i])) ** 2 for i in range(20)))
    new, old = [a for a, _ in factor_pairs(4)], [a for a, _ in factor_pairs(5, ranks=(2, 4))]
    slow = sum(sum(float(ao[p] @ an[q]) ** 2 for p in range(ao.shape[0]) for q in range(an.shape[0]))
               for an, ao in zip(new, old))
    assert float(olora_penalty(new, old)) == pytest.approx(slow)
    orth = torch.linalg.qr(torch.randn(7, 4, dtype=torch.float64, generator=g))[0].T  # 4 orthonormal rows
    assert float(olora_penalty([orth[:2]], [orth[2:]])) == pytest.approx(0.0, abs=1e-20)


def test_dc_variants_on_hand_formulas():
    cur, prev = factor_pairs(6), factor_pairs(7)
    flat = lambda f: torch.cat([t.reshape(-1) for ab in f for t in ab])  # noqa: E731
    cos = lambda x, y: float(x @ y) / math.sqrt(float(x @ x) * float(y @ y))  # noqa: E731
    assert float(dc_global(cur, prev, 0.1)) == pytest.approx(0.1 * (1 - cos(flat(cur), flat(prev))))
    per = [1 - cos(flat([c]), flat([p])) for c, p in zip(cur, prev)]
    assert float(dc_per_module(cur, module_vectors(prev), 0.1)) == pytest.approx(0.1 * sum(per) / 2)
    dw = [1 - cos((b @ a).reshape(-1), (b0 @ a0).reshape(-1)) for (a, b), (a0, b0) in zip(cur, prev)]
    assert float(dc_delta_w(cur, prev, 0.1)) == pytest.approx(0.1 * sum(dw) / 2)
    moved = reparametrise(cur, 8)
    assert float(dc_delta_w(moved, prev, 0.1)) == pytest.approx(float(dc_delta_w(cur, prev, 0.1)))
    assert float(dc_global(moved, prev, 0.1)) != pytest.approx(float(dc_global(cur, prev, 0.1)))
    live = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in cur]
    dc_delta_w(live, prev, 0.1).backward()
    assert all(a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0 for a, b in live)


def test_cl_metrics_on_a_hand_written_r_matrix():
    # three domains; rows: base, after stage 1, 2, 3
    acc = [[0.10, 0.20, 0.30],
           [0.50, 0.25, 0.30],
           [0.40, 0.60, 0.35],
           [0.45, 0.50, 0.70]]
    loss = [[5.0, 4.0, 3.0],
            [3.0, 3.9, 3.0],
            [3.5, 2.0, 2.9],
            [4.0, 2.5, 1.5]]
    m = cl_metrics(acc, loss, single_acc=[0.55, 0.60, 0.80])
    assert m["avg_final_acc"] == pytest.approx((0.45 + 0.50 + 0.70) / 3)
    assert m["bwt"] == pytest.approx(((0.45 - 0.50) + (0.50 - 0.60)) / 2)
    assert m["forgetting"] == pytest.approx([0.50 - 0.45, 0.60 - 0.50])  # max over stages 1-2, then 2
    assert m["delta_loss"] == pytest.approx([1.0, 0.5])
    assert m["delta_ppl"] == pytest.approx([math.exp(4.0) - math.exp(3.0), math.exp(2.5) - math.exp(2.0)])
    assert m["gain_retained_per_domain"] == pytest.approx([(5.0 - 4.0) / 2.0, (4.0 - 2.5) / 2.0])
    assert "gain_retained" not in m  # the two-domain number's key (defect 1 of the review)
    assert m["plasticity"] == pytest.approx([0.4 / 0.45, 0.4 / 0.4, 0.4 / 0.5])
    with pytest.raises(ValueError, match="R matrices"):
        cl_metrics(acc[:1], loss[:1])


def test_paired_bootstrap_ci():
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    mean, lo, hi = paired_bootstrap_ci(a, [x - 0.5 for x in a])
    assert (mean, lo, hi) == pytest.approx((0.5, 0.5, 0.5))  # a constant difference has no spread
    b = [x + d for x, d in zip(a, [0.3, -0.2, 0.1, 0.4, -0.1, 0.2])]
    mean, lo, hi = paired_bootstrap_ci(b, a, seed=1)
    assert mean == pytest.approx(0.7 / 6) and lo < mean < hi and lo > -0.2 and hi < 0.4
    assert paired_bootstrap_ci(b, a, seed=1) == paired_bootstrap_ci(b, a, seed=1)  # same seed, same CI


@pytest.mark.parametrize("variant", ["global", "per_module", "delta_w"])
def test_dc_variants_run_and_their_gradient_norm_is_recorded(tmp_path, variant):
    from conftest import tiny_config
    from hybrid_lora.adapters import load_adapter, snapshot_factors
    from hybrid_lora.runs import run_experiment

    cfg = tiny_config(dc_variant=variant, sweep_ranks=())
    result = run_experiment(cfg, "hybrid", 42, tmp_path, progress=False)
    rows = result["history"]
    assert [r["dc_grad_norm"] is None for r in rows] == [True, False, False, False]  # Stage 1: no DC
    run = tmp_path / "hybrid" / "seed42"
    stage1 = snapshot_factors(load_adapter(cfg, run / "adapter_stage1"))
    final = [(a.clone().requires_grad_(), b.clone().requires_grad_())
             for a, b in snapshot_factors(load_adapter(cfg, run / "adapter_final"))]
    k = final[0][0].shape[0]
    cut = [(a[:k], b[:, :k]) for a, b in stage1]
    flat = lambda f: torch.cat([t.reshape(-1) for ab in f for t in ab])  # noqa: E731
    term = {"global": lambda: hand_cos_term(flat(final), flat(cut), cfg.lambda_dc),
            "per_module": lambda: sum(hand_cos_term(flat([f]), flat([c]), cfg.lambda_dc)
                                      for f, c in zip(final, cut)) / len(final),
            "delta_w": lambda: dc_delta_w(final, stage1, cfg.lambda_dc)}[variant]()
    grads = torch.autograd.grad(term, [t for ab in final for t in ab])
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
    assert rows[-1]["dc_end"] == pytest.approx(float(term.detach()), rel=1e-4, abs=1e-9)
    assert rows[-1]["dc_grad_norm"] == pytest.approx(norm, rel=1e-3) and norm > 0
    lora = run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    assert all(r["dc_grad_norm"] is None for r in lora["history"])
