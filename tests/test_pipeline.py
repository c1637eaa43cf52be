"""End-to-end: all four methods on a tiny config, and one regression test per defect."""
import json

import pytest
import torch
from safetensors.torch import load_file

from hybrid_lora import evaluate_loss_and_token_acc, load_adapter, run_experiment
from hybrid_lora.data import make_loaders
from hybrid_lora.adapters import load_tokenizer, lora_factors
from hybrid_lora.results import EVAL_KEYS, HISTORY_KEYS, read_json, write_summary

from conftest import tiny_config

METHODS = ("lora", "dylora", "dc", "hybrid")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config()
    results = {m: run_experiment(cfg, m, seed=7, out_dir=out, progress=False) for m in METHODS}
    return cfg, out, results


def adapter(out, method, which):
    return load_file(str(out / method / "seed7" / which / "adapter_model.safetensors"))


def test_files_follow_the_schema(runs):
    cfg, out, results = runs
    for m in METHODS:
        d = out / m / "seed7"
        config, history, metrics = (read_json(d / f) for f in ("config.json", "history.json", "metrics.json"))
        assert config["method"] == m and config["seed"] == 7 and config["r"] == cfg.r
        assert [tuple(row) for row in history] == [HISTORY_KEYS] * (cfg.epochs_stage1 + cfg.epochs_stage2)
        assert [(row["stage"], row["epoch"]) for row in history] == [(1, 1), (2, 1), (2, 2), (2, 3)]
        for k in EVAL_KEYS:
            assert set(metrics[k]) == {"loss", "acc"}
        assert metrics["retention"] == pytest.approx(
            metrics["A_after_stage2"]["acc"] / metrics["A_after_stage1"]["acc"])
        assert (d / "adapter_stage1" / "adapter_config.json").is_file()
        assert results[m]["metrics"] == metrics


def test_same_seed_gives_identical_metrics_file(runs, tmp_path):
    cfg, out, _ = runs
    run_experiment(cfg, "hybrid", seed=7, out_dir=tmp_path, progress=False)
    assert (tmp_path / "hybrid/seed7/metrics.json").read_text() == (out / "hybrid/seed7/metrics.json").read_text()


def test_defect1_dc_changes_the_adapter(runs):
    """DC-only must not equal LoRA-only: same seed, same Stage 1, different Stage 2."""
    _, out, results = runs
    s1_lora, s1_dc = adapter(out, "lora", "adapter_stage1"), adapter(out, "dc", "adapter_stage1")
    assert all(torch.equal(s1_lora[k], s1_dc[k]) for k in s1_lora)  # no DC in Stage 1
    final_lora, final_dc = adapter(out, "lora", "adapter_final"), adapter(out, "dc", "adapter_final")
    assert max((final_lora[k] - final_dc[k]).abs().max().item() for k in final_lora) > 1e-4
    stage2_dc = [r["train_dc"] for r in results["dc"]["history"] if r["stage"] == 2]
    assert all(v > 0 for v in stage2_dc[1:])
    assert results["dc"]["history"][-1]["cos_to_stage1"] > results["lora"]["history"][-1]["cos_to_stage1"]


def test_defect2_domain_A_is_evaluated_after_each_stage_from_its_own_adapter(runs):
    cfg, out, results = runs
    tok = load_tokenizer(cfg)
    eval_a = make_loaders(cfg, tok, cfg.domains[0], seed=0).eval
    for m in METHODS:
        metrics = results[m]["metrics"]
        for which, key in (("adapter_stage1", "A_after_stage1"), ("adapter_final", "A_after_stage2")):
            ev = evaluate_loss_and_token_acc(load_adapter(cfg, out / m / "seed7" / which), eval_a)
            assert ev["loss"] == pytest.approx(metrics[key]["loss"], rel=1e-5), (m, key)
            assert ev["acc"] == pytest.approx(metrics[key]["acc"], abs=1e-9), (m, key)
        assert metrics["A_after_stage1"]["loss"] != metrics["A_after_stage2"]["loss"]


def test_defect3_final_adapter_keeps_alpha_over_r(runs):
    cfg, out, _ = runs
    for m in ("dylora", "hybrid"):
        final = load_adapter(cfg, out / m / "seed7" / "adapter_final")
        r_final = cfg.rank_schedule[-1]
        _, a, _, scaling = lora_factors(final)[0]
        assert a.shape[0] == r_final
        assert scaling == pytest.approx(cfg.lora_alpha / cfg.r)
        conf = json.loads((out / m / "seed7" / "adapter_final" / "adapter_config.json").read_text())
        assert conf["r"] == r_final and conf["lora_alpha"] == pytest.approx(cfg.lora_alpha * r_final / cfg.r)


def test_defect5_ordering_term_only_where_the_method_has_it(runs):
    _, _, results = runs
    for m in METHODS:
        order = [(r["stage"], r["train_order"]) for r in results[m]["history"]]
        if m in ("lora", "dc"):
            assert all(v == 0.0 for _, v in order), m
        else:
            assert all(v > 0.0 for _, v in order), m
    lora, dylora = results["lora"]["history"][0], results["dylora"]["history"][0]
    assert lora["train_ce"] == pytest.approx(dylora["train_ce"], rel=1e-3)  # same data, same init


def test_defect7_history_counts_parameters_of_the_current_rank(runs):
    cfg, _, results = runs
    n_embd = cfg.tiny_n_embd
    for m in METHODS:
        for row in results[m]["history"]:
            assert row["trainable_params"] == cfg.tiny_n_layer * row["rank"] * (n_embd + 3 * n_embd)


def test_rank_schedule_only_for_scheduled_methods(runs):
    cfg, _, results = runs
    for m in METHODS:
        ranks = [r["rank"] for r in results[m]["history"] if r["stage"] == 2]
        assert tuple(ranks) == (cfg.rank_schedule if m in ("dylora", "hybrid") else (cfg.r,) * 3)
        assert [r["cos_to_stage1"] is None for r in results[m]["history"]] == [True, False, False, False]


def test_base_evaluations_agree_across_methods_and_summary_is_rebuilt(runs):
    _, out, results = runs
    bases = {json.dumps([results[m]["metrics"]["A_base"], results[m]["metrics"]["B_base"]]) for m in METHODS}
    assert len(bases) == 1
    write_summary(out)
    first = (out / "summary.csv").read_text()
    write_summary(out)
    assert (out / "summary.csv").read_text() == first
    assert len(first.strip().splitlines()) == 1 + len(METHODS)
