"""Domain sequences, continual-learning baselines in the pipeline, shared Stage 1, CL tables."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import hybrid_lora.train as train_mod
from hybrid_lora import ExperimentConfig
from hybrid_lora.adapters import build_base_model, load_adapter, load_tokenizer, lora_factors
from hybrid_lora.analysis.cl_results import cl_table
from hybrid_lora.analysis.stats import bootstrap_counts, paired_bootstrap_stat
from hybrid_lora.grid import sweep_name
from hybrid_lora.config import CL_METHODS, SEQUENCES, from_preset
from hybrid_lora.continual import fisher_diagonal
from hybrid_lora.data import hub_source, load_texts, make_loaders, stage_train_set
from hybrid_lora.evaluate import evaluate_loss_and_token_acc
from hybrid_lora.results import SEQUENCES_FILE, load_summary, read_json, run_dir
from hybrid_lora.grid import run_lambda_sweep
from hybrid_lora.runs import run_experiment

from conftest import tiny_config

THREE = ("imdb", "code", "yelp")


def three_stage(**changes) -> ExperimentConfig:
    """Three built-in domains, 1 epoch each, fixed rank 8; dropout 0 where exactness matters."""
    return tiny_config(domains=THREE, epochs_stage2=1, rank_schedule=(8,), **changes)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    cfg = three_stage(lambda_l2=1.0, lambda_ewc=100.0, lambda_olora=1.0, lambda_dc=1.0)
    methods = ("lora", "dc", "hybrid") + CL_METHODS
    return cfg, out, {m: run_experiment(cfg, m, 42, out, progress=False) for m in methods}


def test_a_three_stage_sequence_runs_end_to_end_for_every_method(three_runs):
    cfg, out, results = three_runs
    for method, res in results.items():
        rd = run_dir(out, method, 42)
        m = res["metrics"]
        assert res["complete"] and m["R"]["domains"] == list(THREE)
        assert len(m["R"]["loss"]) == 4 and all(len(row) == 3 for row in m["R"]["loss"])  # t = 0..3
        assert [(h["stage"], h["epoch"]) for h in res["history"]] == [(1, 1), (2, 1), (3, 1)]
        for name in ("adapter_stage1", "adapter_stage2", "adapter_final"):
            assert (rd / name / "adapter_model.safetensors").exists(), (method, name)
        seq = read_json(rd / SEQUENCES_FILE)
        for t in range(4):  # the per-sequence sums add up to every entry of R
            for i in range(3):
                e = seq["R"][t][i]
                assert len(e["nll"]) == cfg.n_eval
                assert sum(e["nll"]) / sum(e["tokens"]) == pytest.approx(m["R"]["loss"][t][i], rel=1e-6)  # fp32 sums
                assert sum(e["hits"]) / sum(e["tokens"]) == pytest.approx(m["R"]["acc"][t][i], rel=1e-12)
        assert "A_after_stage2" not in m  # the two-domain keys would be ambiguous here
    # the base row is the same base model for every method; Stage 1 is shared where it is the same
    assert len({json.dumps(r["metrics"]["R"]["loss"][0]) for r in results.values()}) == 1
    stage1 = {m: json.dumps(r["metrics"]["R"]["loss"][1]) for m, r in results.items()}
    assert len({stage1[m] for m in results if m not in ("hybrid", "multitask")}) == 1
    assert stage1["hybrid"] != stage1["lora"]  # ordering term in Stage 1
    assert stage1["multitask"] != stage1["lora"]  # all domains from Stage 1 on


def test_forgetting_stats_on_all_sequences_equal_the_r_matrix(three_runs):
    """The pair check's quantities from eval_sequences.json (all weights 1) against R in metrics."""
    import numpy as np

    from hybrid_lora.analysis.cl_results import forgetting_stats

    cfg, out, results = three_runs
    L = results["lora"]["metrics"]["R"]["loss"]
    f = forgetting_stats(read_json(run_dir(out, "lora", 42) / SEQUENCES_FILE))
    w = np.ones((1, cfg.n_eval))
    expected = {"delta_loss": L[3][0] - L[1][0], "first_gain": L[0][0] - L[1][0], "new_loss": L[3][2],
                "share_lost": (L[3][0] - L[1][0]) / (L[0][0] - L[1][0]), "new_gain": L[0][2] - L[3][2]}
    for key, value in expected.items():
        assert float(f[key](w)[0]) == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_each_regularizer_acts_and_changes_the_result(three_runs):
    _, _, results = three_runs
    final = {m: r["metrics"]["R"]["loss"][3] for m, r in results.items()}
    for method, column in (("dc", "dc"), ("l2", "penalty"), ("ewc", "penalty"), ("olora", "penalty")):
        later = [h for h in results[method]["history"] if h["stage"] > 1]
        assert all(h[f"{column}_grad_norm"] > 0 and h[f"{column}_end"] > 0 for h in later), method
        assert final[method] != final["lora"], method
    for method in ("lora", "replay", "cumulative", "multitask", "freeze_add", "single"):
        assert all(h["penalty_end"] is None and h["dc_end"] is None for h in results[method]["history"])
    for method in CL_METHODS + ("lora",):
        if method not in ("l2", "ewc", "olora"):
            assert all(h["train_penalty"] == 0 for h in results[method]["history"])


def test_single_trains_each_domain_alone(three_runs):
    """"single" starts every stage from the base model: its R row t on domains other than t and
    the earlier ones equals the base model exactly where the new adapter starts (B = 0)."""
    cfg, out, results = three_runs
    tok = load_tokenizer(cfg)
    eval_code = make_loaders(cfg, tok, "code", 42)[1]
    model = load_adapter(cfg, run_dir(out, "single", 42) / "adapter_stage2")  # trained on code only
    ev = evaluate_loss_and_token_acc(model, eval_code)
    assert ev["loss"] == pytest.approx(results["single"]["metrics"]["R"]["loss"][2][1], rel=1e-6)


def test_freeze_and_add_final_model_is_base_plus_every_stage_adapter(three_runs):
    """Independent reconstruction: W = W0 + sum over stages of s_k B_k A_k, written into a plain
    GPT-2 base by hand, evaluates exactly like the pipeline's final model."""
    cfg, out, results = three_runs
    for method in ("freeze_add", "olora"):
        rd = run_dir(out, method, 42)
        tok = load_tokenizer(cfg)
        base = build_base_model(cfg, vocab_size=len(tok))
        mods = dict(base.named_modules())
        with torch.no_grad():
            for name in ("adapter_stage1", "adapter_stage2", "adapter_final"):
                for mod_name, a, b, s in lora_factors(load_adapter(cfg, rd / name)):
                    conv = mods[mod_name.split("base_model.model.", 1)[1]]
                    conv.weight += s * (b @ a).T  # Conv1D stores W as [in, out]
        for i, domain in enumerate(THREE):
            ev = evaluate_loss_and_token_acc(base, make_loaders(cfg, tok, domain, 42)[1])
            assert ev["loss"] == pytest.approx(results[method]["metrics"]["R"]["loss"][3][i], rel=1e-5)
        # the first domain after Stage 1 is kept better by a frozen adapter than by no adapter at all
        assert results[method]["metrics"]["R"]["loss"][3][0] != results[method]["metrics"]["R"]["loss"][0][0]


def test_shared_stage1_gives_the_numbers_of_training_it_again(tmp_path, three_runs):
    cfg, out, results = three_runs
    assert read_json(run_dir(out, "l2", 42) / "stage1.json")["copied_from"] in (
        "lora/seed42", "dc/seed42", "single/seed42", "cumulative/seed42")
    alone = run_experiment(dataclasses.replace(cfg, share_stage1=False), "l2", 42, tmp_path, progress=False)
    assert "copied_from" not in read_json(run_dir(tmp_path, "l2", 42) / "stage1.json")
    assert alone["metrics"] == results["l2"]["metrics"]
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in h]  # noqa: E731
    assert strip(alone["history"]) == strip(results["l2"]["history"])
    for name in ("adapter_stage1", "adapter_final"):
        assert ((tmp_path / "l2/seed42" / name / "adapter_model.safetensors").read_bytes()
                == (out / "l2/seed42" / name / "adapter_model.safetensors").read_bytes())


def test_stage1_is_shared_only_under_the_same_stage1_settings(tmp_path, monkeypatch):
    cfg = three_stage(replay_fraction=0.25)  # 4 samples of each earlier domain: 16 + 4, 16 + 8
    run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    calls = [0]
    real = train_mod.causal_lm_sums

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "causal_lm_sums", counted)
    run_experiment(cfg, "replay", 42, tmp_path, progress=False)
    assert calls[0] == 5 + 6  # batches of 4: Stage 1 copied, Stages 2 and 3 trained
    calls[0] = 0
    run_experiment(dataclasses.replace(cfg, lora_dropout=0.2), "replay", 42, tmp_path / "other", progress=False)
    run_experiment(dataclasses.replace(cfg, lora_dropout=0.2), "lora", 42, tmp_path / "other", progress=False)
    assert calls[0] == (4 + 5 + 6) + (4 + 4)  # another dropout: Stage 1 trained again, then shared
    assert "copied_from" not in read_json(run_dir(tmp_path / "other", "replay", 42) / "stage1.json")


def test_a_stage1_saved_before_a_config_field_existed_is_still_shared(tmp_path, monkeypatch):
    """A stage1.json key without a field added later (here matryoshka_weighting, removed by
    hand) matches when the field is at its default, and not otherwise."""
    from hybrid_lora.methods import get_method
    from hybrid_lora.results import write_json_atomic
    from hybrid_lora.runs import _same_key, stage1_key

    cfg = three_stage()
    run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    path = run_dir(tmp_path, "lora", 42) / "stage1.json"
    saved = read_json(path)
    del saved["key"]["config"]["matryoshka_weighting"]
    write_json_atomic(path, saved)
    run_experiment(cfg, "l2", 42, tmp_path, progress=False)
    assert read_json(run_dir(tmp_path, "l2", 42) / "stage1.json")["copied_from"] == "lora/seed42"
    key = read_json(run_dir(tmp_path, "l2", 42) / "stage1.json")["key"]
    other = dataclasses.replace(cfg, matryoshka_weighting="sum")
    assert not _same_key(saved["key"], {**key, "config": {**key["config"], "matryoshka_weighting": "sum"}})
    assert stage1_key(other, get_method("lora"), 42, key["data"])["config"]["matryoshka_weighting"] == "sum"


def test_a_stage1_record_without_its_adapter_is_not_shared(tmp_path):
    cfg = three_stage()
    lora = run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    shutil.rmtree(run_dir(tmp_path, "lora", 42) / "adapter_stage1")  # stage1.json left behind alone
    dc = run_experiment(cfg, "dc", 42, tmp_path, progress=False)
    assert "copied_from" not in read_json(run_dir(tmp_path, "dc", 42) / "stage1.json")
    assert dc["metrics"]["R"]["loss"][:2] == lora["metrics"]["R"]["loss"][:2]  # trained again, same Stage 1


def test_replay_cumulative_and_multitask_training_sets(cfg):
    cfg = dataclasses.replace(cfg, domains=THREE, n_train=100, replay_fraction=0.05, epochs_stage2=1,
                              rank_schedule=(8,))
    tok = load_tokenizer(cfg)
    sets = [make_loaders(cfg, tok, d, 0).train.dataset for d in THREE]
    current, length = stage_train_set(cfg, sets, 3, "current")
    assert current is sets[2] and length is None
    replay, length = stage_train_set(cfg, sets, 3, "replay")
    assert len(replay) == 100 + 5 + 5 and length is None
    rows = {tuple(replay[j][0].tolist()) for j in range(100, 110)}
    earlier = {tuple(x.tolist()) for ds in sets[:2] for x in ds.tensors[0]}
    assert rows <= earlier and len(rows) == 10  # ten distinct samples of the two earlier domains
    again, _ = stage_train_set(cfg, sets, 3, "replay")
    assert [again[j][0].tolist() for j in range(100, 110)] == [replay[j][0].tolist() for j in range(100, 110)]
    cumulative, length = stage_train_set(cfg, sets, 2, "cumulative")
    assert len(cumulative) == 200 and length == 100  # the union so far, epochs as long as one domain's
    assert stage_train_set(cfg, sets, 1, "cumulative")[0] is sets[0]
    for stage in (1, 2, 3):  # multitask: every domain in every stage, Stage 1 included
        union, length = stage_train_set(cfg, sets, stage, "all")
        assert len(union) == 300 and length == 100
        assert torch.equal(union[250][0], sets[2][50][0])
    with pytest.raises(ValueError, match="data='mixed'"):
        stage_train_set(cfg, sets, 2, "mixed")


def test_fisher_matches_per_sequence_backward_reference(cfg):
    from hybrid_lora.adapters import build_model
    from hybrid_lora.losses import causal_lm_sums
    from conftest import randomize_lora

    cfg = dataclasses.replace(cfg, lora_dropout=0.0)
    model, tok = build_model(cfg)
    randomize_lora(model, seed=3, scale=0.1)
    data = make_loaders(cfg, tok, "imdb", 0)[0].dataset
    fisher = fisher_diagonal(model, data, 5)
    params = [t for _, a, b, _ in lora_factors(model) for t in (a, b)]
    ref = [torch.zeros_like(p) for p in params]
    model.eval()  # the base model's own dropout off, as in fisher_diagonal
    for j in range(5):  # slow reference: .backward() per sequence, read .grad
        model.zero_grad()
        ids, mask, labels = (t[None] for t in data[j])
        ce, n, _ = causal_lm_sums(model(input_ids=ids, attention_mask=mask).logits, labels)
        (ce / n).backward()
        for r, p in zip(ref, params):
            r += p.grad.square() / 5
    for f, r in zip(fisher, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-12)


def test_bootstrap_counts_and_stat_against_a_loop():
    w = bootstrap_counts(7, 50, seed=1)
    idx = np.random.default_rng(1).integers(0, 7, size=(50, 7))
    assert (w.sum(1) == 7).all() and (w[3] == np.bincount(idx[3], minlength=7)).all()
    nll, tok = np.arange(1.0, 8.0), np.array([2, 1, 3, 1, 2, 2, 1], dtype=float)
    point, lo, hi = paired_bootstrap_stat(lambda w: (w @ nll) / (w @ tok), 7, n_boot=500, seed=2)
    assert point == pytest.approx(nll.sum() / tok.sum())
    ref = [nll[i].sum() / tok[i].sum() for i in np.random.default_rng(2).integers(0, 7, size=(500, 7))]
    assert (lo, hi) == pytest.approx((np.quantile(ref, 0.025), np.quantile(ref, 0.975)))


def _fake_run(out, run, method, seed, R_nll, tokens, lam=None, extra=None):
    """A finished run folder with hand-written per-sequence sums R_nll[t][i] (lists of floats);
    metrics.json written by `run_metrics`, as a real run's."""
    from hybrid_lora.results import run_metrics, write_json_atomic

    d = run_dir(out, run, seed)
    loss = [[sum(e) / sum(tokens) for e in row] for row in R_nll]
    acc = [[0.1 + 0.1 * t + 0.01 * i for i in range(len(row))] for t, row in enumerate(R_nll)]
    cfg = {**ExperimentConfig.smoke().to_dict(), "method": method, "seed": seed, **(extra or {})}
    write_json_atomic(d / "config.json", cfg)
    write_json_atomic(d / "history.json", [{"seconds": 1.0}])
    write_json_atomic(d / "metrics.json", run_metrics(["imdb", "yelp"], loss, acc))
    write_json_atomic(d / SEQUENCES_FILE, {"domains": ["imdb", "yelp"], "R": [
        [{"nll": e, "tokens": tokens, "hits": [1] * len(e)} for e in row] for row in R_nll]})


def test_cl_table_against_hand_computed_differences(tmp_path):
    tokens = [10, 10, 10, 10]
    base = [[50.0] * 4, [80.0] * 4]
    for seed, bump in ((1, 0.0), (2, 1.0)):
        after1 = [[40.0 + bump] * 4, [78.0] * 4]
        # R rows: t = 0 base, t = 1 after Stage 1, t = 2 after Stage 2; columns imdb, yelp
        _fake_run(tmp_path, "lora", "lora", seed, [base, after1, [[46.0, 47.0, 45.0, 46.0], [60.0] * 4]], tokens)
        _fake_run(tmp_path, "l2", "l2", seed, [base, after1, [[41.0 + bump] * 4, [70.0] * 4]], tokens,
                  extra={"lambda_l2": 0.5})
        _fake_run(tmp_path, "single", "single", seed, [base, after1, [base[0], [50.0] * 4]], tokens)
    table = cl_table(tmp_path, n_boot=200)
    # forgetting of lora, seed 1: 4.6 - 4.0 = 0.6; seed 2: 4.6 - 4.1 = 0.5 -> mean 0.55
    assert table.loc["lora", "delta_loss_first"] == pytest.approx(0.55)
    assert table.loc["l2", "delta_loss_first"] == pytest.approx(0.1)
    assert table.loc["l2", "lambda"] == 0.5 and math.isnan(table.loc["lora", "lambda"])
    # l2 - lora: seed 1: 0.1 - 0.6; seed 2: 0.1 - 0.5 -> -0.45; every resample is below 0
    assert table.loc["l2", "d_forget"] == pytest.approx(-0.45)
    assert table.loc["l2", "d_forget_hi"] < 0
    assert table.loc["l2", "seeds_forget_less"] == 2 and table.loc["single", "seeds_forget_less"] == 0
    assert table.loc["l2", "d_new_loss"] == pytest.approx(7.0 - 6.0)
    assert not table.loc["lora", "forgets_less_seed"] and math.isnan(table.loc["lora", "d_forget"])
    # seed level: differences -0.5, -0.4; mean -0.45, s.d. 0.1 / sqrt(2); t(0.975, 1) = 12.7062:
    # half-width 12.7062 * 0.0707107 / sqrt(2) = 0.635310. The bootstrap over sequences says
    # "below zero"; two seeds cannot, and the table says so.
    half = 12.7062047 * (0.1 / math.sqrt(2)) / math.sqrt(2)
    assert table.loc["l2", "d_forget_seed"] == pytest.approx(-0.45)
    assert (table.loc["l2", "d_forget_seed_lo"], table.loc["l2", "d_forget_seed_hi"]) == pytest.approx(
        (-0.45 - half, -0.45 + half), rel=1e-6)
    assert not table.loc["l2", "forgets_less_seed"]
    # new gain: l2 8.0 - 7.0 = 1.0 against lora's 8.0 - 6.0 = 2.0 in both seeds (no spread)
    assert table.loc["l2", "d_new_gain_seed"] == pytest.approx(-1.0)
    assert table.loc["l2", "d_new_gain_seed_lo"] == pytest.approx(-1.0)
    # new gain: base 8.0 - final 7.0; plasticity: loss gain over single's (8.0 - 5.0)
    assert table.loc["l2", "new_gain"] == pytest.approx(1.0)
    assert table.loc["l2", "plasticity_new"] == pytest.approx(1.0 / 3.0)
    assert table.loc["lora", "plasticity_new"] == pytest.approx(2.0 / 3.0)
    summary = load_summary(tmp_path)
    assert set(summary["run"]) == {"lora", "l2", "single"}
    # the CLI: `table` writes the same table; `plot --only pareto` draws just that figure
    from hybrid_lora.cli import main

    assert main(["table", "--results", str(tmp_path), "--n-boot", "200"]) == 0
    import pandas as pd
    written = pd.read_csv(tmp_path / "cl_table.csv", index_col="run")
    assert written.loc["l2", "d_forget"] == pytest.approx(-0.45)
    assert main(["plot", "--results", str(tmp_path), "--images", str(tmp_path / "img"), "--only", "pareto"]) == 0
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["pareto.png"]


def test_cli_lambdas_are_parsed_and_bad_ones_named():
    from hybrid_lora.cli import parse_lambdas

    assert parse_lambdas(["dc=0.1,1", "ewc=1e4"]) == {"dc": (0.1, 1.0), "ewc": (1e4,)}
    with pytest.raises(ValueError, match="'dcc=1'"):
        parse_lambdas(["dcc=1"])
    with pytest.raises(ValueError, match="'a,b' is not a list of numbers"):
        parse_lambdas(["l2=a,b"])


def test_lambda_sweep_runs_are_named_and_share_stage1(tmp_path):
    cfg = dataclasses.replace(three_stage(), domains=("imdb", "code"), seeds=(42,))
    names = run_lambda_sweep(cfg, tmp_path, "l2", (cfg.lambda_l2, 0.5))
    assert names == ["l2", sweep_name("l2", 0.5)] == ["l2", "l2_lam0.5"]
    saved = read_json(run_dir(tmp_path, "l2_lam0.5", 42) / "config.json")
    assert saved["lambda_l2"] == 0.5 and saved["method"] == "l2"
    assert read_json(run_dir(tmp_path, "l2_lam0.5", 42) / "stage1.json")["copied_from"] == "l2/seed42"
    with pytest.raises(ValueError, match="'lora' has no lambda"):
        run_lambda_sweep(cfg, tmp_path, "lora", (1.0,))
    # another DC variant beside the default runs: its own folders, and a `variant` column
    from hybrid_lora.grid import run_all

    variant = dataclasses.replace(cfg, methods=("dc",), dc_variant="delta_w")
    rows = run_all(variant, tmp_path, progress=False, lambdas={"dc": (2.0,)}, suffix="_delta_w")
    assert [r["run"] for r in rows] == ["dc_delta_w", "dc_delta_w_lam2"]
    assert [r["variant"] for r in rows] == ["delta_w", "delta_w"] and rows[1]["lambda"] == 2.0
    assert set(load_summary(tmp_path)["variant"]) == {"", "delta_w"}


def test_sequences_presets_and_domain_validation():
    assert SEQUENCES["imdb-code-yelp"] == ("imdb", "code", "yelp")
    cfg = from_preset("forgetting", sequence="code-imdb", data_dir="/data")
    assert cfg.domains == ("code", "imdb") and cfg.data_source == "local" and "multitask" in cfg.methods
    assert len(cfg.seeds) == 5 and cfg.n_val > 0  # study presets: 5 seeds, validation texts
    assert from_preset("smoke", sequence="imdb-code").domains == ("imdb", "code")
    with pytest.raises(ValueError, match="sequence='imdb-news'"):
        from_preset("forgetting", sequence="imdb-news")
    with pytest.raises(ValueError, match="domains=\\(\\): give one or more domains"):
        dataclasses.replace(ExperimentConfig.smoke(), domains=())
    assert dataclasses.replace(ExperimentConfig.smoke(), domains=("imdb",)).domains == ("imdb",)  # Stage 1 only
    with pytest.raises(ValueError, match="unknown hub domain 'news'"):
        dataclasses.replace(ExperimentConfig(), domains=("imdb", "news"))
    ok = dataclasses.replace(ExperimentConfig(), domains=("imdb", "ag_news:text", "wikitext@wikitext-2-raw-v1:text"))
    assert ok.domains[2].endswith(":text")
    assert hub_source("wikitext@wikitext-2-raw-v1:text") == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train",
                                                             "test", "text")
    assert hub_source("ag_news:text")[:2] == ("fancyzhx/ag_news", None)
    assert hub_source("yelp")[0] == "fancyzhx/yelp_polarity"
    with pytest.raises(ValueError, match="replay_fraction=1.5"):
        dataclasses.replace(ExperimentConfig(), replay_fraction=1.5)


def test_builtin_code_domain_is_python(cfg):
    train, test, _ = load_texts(dataclasses.replace(cfg, domains=("imdb", "code")), "code")
    assert all(t.startswith("def ") and "return" in t for t in train + test)
    compile(train[0], "<builtin>", "exec")  # valid Python source
