"""Rank per input: per-row masks in one batched forward pass against each sequence cut alone,
the feature against a slow loop, the policies' average ranks."""
import copy

import pytest
import torch

from hybrid_lora import build_model, rebuild_model_for_new_rank, run_experiment
from hybrid_lora.per_input import PerRowRank, default_averages, levels_around, policy, row_variance
from hybrid_lora.results import read_json, run_dir

from conftest import randomize_lora, tiny_config


def test_row_variance_against_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    for b in range(3):
        valid = x[b, mask[b].bool()]  # [n, d]
        slow = sum(valid[:, f].var(unbiased=False) for f in range(4)) / 4
        assert float(row_variance(x, mask)[b]) == pytest.approx(float(slow), rel=1e-5, abs=1e-7)


def test_each_row_gets_its_own_rank_in_one_forward_pass():
    cfg = tiny_config(lora_dropout=0.0)
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    model.eval()
    ids = torch.randint(1, 257, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    want = torch.tensor([1, 4, 8, 2])
    hooks = PerRowRank(model, lambda f: want, "dylora")
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask).logits
    hooks.close()
    assert torch.equal(hooks.ranks[0], want)
    for row, k in enumerate(want.tolist()):  # reference: the adapter cut to rank k, alone
        cut = rebuild_model_for_new_rank(copy.deepcopy(model), k, cfg, scaling="peft").eval()
        with torch.no_grad():
            alone = cut(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def test_policies_hit_their_average_on_the_calibration_texts():
    cal = torch.linspace(0, 1, 101)
    assert levels_around(3, 64) == (2, 4) and levels_around(48, 64) == (32, 64)
    assert default_averages(64) == [3, 6, 12, 24, 48]
    with pytest.raises(ValueError, match="between two of the levels"):
        levels_around(4, 64)
    for avg in (3, 6, 12):
        choose, info = policy("feature", avg, 64, cal)
        ranks = choose(cal)
        assert ranks.double().mean().item() == pytest.approx(avg, abs=0.1 * avg)
        assert (ranks[cal > info["threshold"]] == info["k_hi"]).all()  # monotone in the feature
        choose, _ = policy("random", avg, 64, cal)
        assert set(choose(cal).tolist()) <= {info["k_lo"], info["k_hi"]}
        assert policy("fixed", avg, 64, cal)[0](cal).tolist() == [avg] * 101


def test_per_input_run_through_the_cli(tmp_path):
    from hybrid_lora.cli import main

    cfg = tiny_config(n_val=8, rank_schedule=(8, 8, 8), sweep_ranks=())  # the final adapter at r = 8
    run_experiment(cfg, "matryoshka", 42, tmp_path, progress=False)
    main(["per-input", "--run", str(run_dir(tmp_path, "matryoshka", 42)), "--averages", "3", "6",
          "--no-progress"])
    out = read_json(run_dir(tmp_path, "matryoshka", 42) / "per_input.json")
    assert out["n_calibration"] == {"imdb": 8, "yelp": 8} and out["scaling"] == "dylora"
    assert {(r["domain"], r["policy"], r["target_avg"]) for r in out["rows"]} == {
        (d, p, a) for d in cfg.domains for p in ("feature", "random", "fixed") for a in (3, 6)}
    fixed = [r for r in out["rows"] if r["policy"] == "fixed"]
    assert all(r["avg_rank"] == r["target_avg"] for r in fixed)
    run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    assert main(["per-input", "--run", str(run_dir(tmp_path, "lora", 42)), "--no-progress"]) == 2
