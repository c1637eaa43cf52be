"""Review defects 1 and 2 (one key, one meaning; evaluation and loading never touch the
training RNG), forgetting at matched gain chosen on validation texts, README tables."""
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import hybrid_lora.runs as train_mod
from hybrid_lora.adapters import build_model, load_adapter
from hybrid_lora.analysis.cl_results import (CL_MARKDOWN, MATCHED_MARKDOWN, cl_table, matched_gain_table,
                                            matched_per_seed)
from hybrid_lora.analysis.markdown import markdown_table
from hybrid_lora.grid import lambda_grid
from hybrid_lora.data import make_loaders
from hybrid_lora.evaluate import evaluate_loss_and_token_acc
from hybrid_lora.results import (SCHEMA_VERSION, load_summary, read_json, run_dir, run_metrics,
                                 write_json_atomic, write_summary)
from hybrid_lora.runs import run_experiment

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_review1_gain_retained_stays_a_number_in_metrics_and_summary(tmp_path):
    cfg = tiny_config(sweep_ranks=())
    m = run_experiment(cfg, "lora", 42, tmp_path, progress=False)["metrics"]
    a0, a1, a2 = (m[k]["loss"] for k in ("A_base", "A_after_stage1", "A_after_stage2"))
    assert isinstance(m["gain_retained"], float)
    assert m["gain_retained"] == pytest.approx((a0 - a2) / (a0 - a1), rel=1e-12)
    assert m["gain_retained_per_domain"] == [m["gain_retained"]]
    assert m["schema_version"] == SCHEMA_VERSION == 4
    assert read_json(run_dir(tmp_path, "lora", 42) / "metrics.json") == m
    written = pd.read_csv(write_summary(tmp_path))
    assert written["gain_retained"].dtype == float  # schema 3 wrote "[-0.375]" here
    assert written.loc[0, "gain_retained"] == pytest.approx(m["gain_retained"])
    assert written.loc[0, "gain_retained_first"] == pytest.approx(m["gain_retained"])


def test_review1_schema3_folders_still_load(tmp_path):
    """A schema-3 metrics.json kept the per-domain list under `gain_retained`; a `joint` run is
    today's `cumulative`."""
    m = run_metrics(["imdb", "yelp"], [[5.0, 8.0], [4.0, 8.0], [4.5, 7.0]], [[0.1, 0.1], [0.2, 0.1], [0.15, 0.2]])
    old = {k: v for k, v in m.items() if k != "gain_retained_per_domain"}
    old.update(gain_retained=[0.5], schema_version=3)
    d = run_dir(tmp_path, "joint", 1)
    write_json_atomic(d / "config.json", {**tiny_config().to_dict(), "method": "joint", "seed": 1})
    write_json_atomic(d / "history.json", [{"seconds": 1.0}])
    write_json_atomic(d / "metrics.json", old)
    row = load_summary(tmp_path).iloc[0]
    assert row["gain_retained"] == 0.5 and row["gain_retained_first"] == 0.5 and row["method"] == "joint"


def test_review2_evaluation_and_adapter_loading_leave_the_training_rng_alone(cfg, tmp_path):
    model, tok = build_model(cfg)
    data = make_loaders(cfg, tok, "imdb", 1).eval.dataset
    model.save_pretrained(tmp_path / "adapter")
    plain = DataLoader(data, batch_size=4)  # no generator of its own: it would draw a base seed
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    evaluate_loss_and_token_acc(model, plain)
    load_adapter(cfg, tmp_path / "adapter")
    assert torch.equal(torch.rand(4), expected)


def test_review2_stage1_of_a_seed_is_bit_identical_whatever_the_sequence_length(tmp_path):
    """Before: evaluating the base on every domain drew from the dropout stream, so Stage 1 of
    imdb-code and of imdb-code-yelp trained with different masks."""
    two = tiny_config(domains=("imdb", "yelp"), epochs_stage2=1, rank_schedule=(8,), share_stage1=False,
                      sweep_ranks=())
    three = dataclasses.replace(two, domains=("imdb", "yelp", "code"))
    assert two.lora_dropout > 0
    a = run_experiment(two, "lora", 42, tmp_path / "two", progress=False, stop_after_stage=1)
    b = run_experiment(three, "lora", 42, tmp_path / "three", progress=False, stop_after_stage=1)
    assert a["history"][0]["train_ce"] == b["history"][0]["train_ce"]
    files = [p / "lora/seed42/adapter_stage1/adapter_model.safetensors" for p in (tmp_path / "two", tmp_path / "three")]
    assert files[0].read_bytes() == files[1].read_bytes()


def test_review2_every_method_starts_stage2_from_the_same_random_state(tmp_path, monkeypatch):
    """Same seed, same Stage 1: loading the references (EWC, O-LoRA) or building a new adapter
    (freeze_add, olora, single) must not move the stream that drives Stage 2's dropout masks."""
    states = {}
    real = train_mod.train_stage

    def spy(model, cfg, method, stage, *args, **kwargs):
        if stage == 2:
            states[method.name] = torch.get_rng_state()
        return real(model, cfg, method, stage, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_stage", spy)
    cfg = tiny_config(epochs_stage2=1, rank_schedule=(8,), sweep_ranks=(), ewc_samples=4)
    methods = ("lora", "dc", "l2", "ewc", "replay", "freeze_add", "olora", "single")
    for method in methods:
        run_experiment(cfg, method, 42, tmp_path, progress=False)
    assert set(states) == set(methods)
    assert all(torch.equal(states[m], states["lora"]) for m in methods), \
        [m for m in methods if not torch.equal(states[m], states["lora"])]


def _run(out, run, method, seed, loss, val_loss, lam=None):
    """A finished two-domain run with hand-written test and validation R matrices (loss)."""
    d = run_dir(out, run, seed)
    extra = {} if lam is None else {"lambda_l2" if method == "l2" else "lambda_ewc": lam}
    write_json_atomic(d / "config.json", {**tiny_config().to_dict(), "method": method, "seed": seed, **extra})
    write_json_atomic(d / "history.json", [{"seconds": 1.0}])
    acc = [[0.1, 0.1]] * 3
    write_json_atomic(d / "metrics.json", run_metrics(["imdb", "code"], loss, acc, {"loss": val_loss, "acc": acc}))


def _curve(forget, test_gain, val_gain):
    """R rows (base, after Stage 1, after Stage 2) with the given forgetting on imdb and gains on code."""
    return ([[5.0, 8.0], [4.0, 8.0], [4.0 + forget, 8.0 - test_gain]],
            [[5.0, 8.0], [4.0, 8.0], [4.0 + forget, 8.0 - val_gain]])


def test_forgetting_at_matched_gain_is_chosen_on_validation_and_read_on_test(tmp_path):
    for seed, lora_forget in ((1, 0.6), (2, 0.5)):
        _run(tmp_path, "lora", "lora", seed, *_curve(lora_forget, 2.0, 2.0))
        # l2: validation gains 1.9, 1.5, 0.5 at lambda 0.01, 0.1, 1; test gains differ on purpose
        for lam, forget, test_gain, val_gain in ((0.01, 0.3, 1.95, 1.9), (0.1, 0.1, 1.45, 1.5), (1.0, 0.0, 0.5, 0.5)):
            _run(tmp_path, f"l2_lam{lam:g}", "l2", seed, *_curve(forget, test_gain, val_gain), lam=lam)
        for lam in (10.0, 100.0):  # ewc never gets near 0.9 x 2.0 on validation
            _run(tmp_path, f"ewc_lam{lam:g}", "ewc", seed, *_curve(0.1, 1.0, 1.0 / lam ** 0.1), lam=lam)
    t = matched_gain_table(tmp_path, fraction=0.9).set_index("method")
    # target 1.8: a quarter of the way from 1.9 to 1.5 in log(lambda) -> 0.01^0.75 0.1^0.25
    assert t.loc["l2", "lambda_star"] == pytest.approx(10 ** -1.75)
    assert t.loc["l2", "forget"] == pytest.approx(0.75 * 0.3 + 0.25 * 0.1)
    assert t.loc["l2", "gain"] == pytest.approx(0.75 * 1.95 + 0.25 * 1.45)  # read on test
    assert t.loc["l2", "d_forget"] == pytest.approx(((0.25 - 0.6) + (0.25 - 0.5)) / 2)
    assert t.loc["l2", "n_seeds"] == 2 and t.loc["l2", "lambdas"] == "0.01,0.1,1"
    assert t.loc["ewc", "n_seeds"] == 0 and math.isnan(t.loc["ewc", "forget"])
    assert "| l2 |  | 0.01,0.1,1 | 0.0178 | 2 | +0.2500 ± 0.0000 |" in markdown_table(t.reset_index(), MATCHED_MARKDOWN)


def test_matched_per_seed_pairs_two_methods_at_each_seed(tmp_path):
    """Two penalties at matched gain, seed by seed, on hand numbers: the target is 0.9 x 2.0 on
    validation at every seed; l2 crosses it a quarter of the way from 0.01 to 0.1 (forgetting
    0.25), ewc half way from 10 to 100 (forgetting 0.1 at seed 1, 0.3 at seed 2). Seed 3's
    l2 never reaches it and has no row; ewc has no run at seed 3. The table's means are the
    per-seed rows' means."""
    for seed, lora_forget, ewc_forgets in ((1, 0.6, (0.2, 0.0)), (2, 0.5, (0.4, 0.2)), (3, 0.5, None)):
        _run(tmp_path, "lora", "lora", seed, *_curve(lora_forget, 2.0, 2.0))
        l2 = ((0.01, 0.3, 1.95, 1.9), (0.1, 0.1, 1.45, 1.5)) if seed < 3 else ((0.01, 0.3, 1.7, 1.7), (0.1, 0.1, 1.5, 1.5))
        for lam, forget, test_gain, val_gain in l2:
            _run(tmp_path, f"l2_lam{lam:g}", "l2", seed, *_curve(forget, test_gain, val_gain), lam=lam)
        for lam, forget, val_gain in zip((10.0, 100.0), ewc_forgets or (), (1.9, 1.7)):
            _run(tmp_path, f"ewc_lam{lam:g}", "ewc", seed, *_curve(forget, val_gain, val_gain), lam=lam)
    rows = matched_per_seed(tmp_path, fraction=0.9).set_index(["method", "seed"])
    assert sorted(rows.index) == [("ewc", 1), ("ewc", 2), ("l2", 1), ("l2", 2)]
    assert rows.loc[("ewc", 1), "lambda"] == pytest.approx(10 ** 1.5)
    assert rows.loc[("l2", 2), "lambda"] == pytest.approx(10 ** -1.75)
    mix = rows.loc[("ewc", 2), "mix"]
    assert [r for r, _ in mix] == ["ewc_lam10", "ewc_lam100", "lora"] and [w for _, w in mix] == pytest.approx([0.5, 0.5, -1])
    ewc_minus_l2 = rows.loc["ewc", "forget"] - rows.loc["l2", "forget"]
    assert list(ewc_minus_l2) == pytest.approx([0.1 - 0.25, 0.3 - 0.25])
    assert list(rows.loc["ewc", "d_forget"]) == pytest.approx([0.1 - 0.6, 0.3 - 0.5])
    assert list(rows.loc["ewc", "d_gain"]) == pytest.approx([-0.2, -0.2])
    t = matched_gain_table(tmp_path, fraction=0.9).set_index("method")
    assert t.loc["ewc", "forget"] == pytest.approx(0.2) and t.loc["ewc", "n_seeds"] == 2
    assert t.loc["l2", "n_seeds"] == 2 and t.loc["l2", "d_forget"] == pytest.approx((-0.35 - 0.25) / 2)


def test_lambda_grid_has_three_points_per_decade():
    assert lambda_grid(0.1, 10) == (0.1, 0.215, 0.464, 1.0, 2.15, 4.64, 10.0)
    assert lambda_grid(1e-4, 1e-4) == (1e-4,)
    # regression: a rounded grid point as lo drifted the grid (2.15, 4.63, 9.98, 21.5)
    assert lambda_grid(2.15, 21.5) == (2.15, 4.64, 10.0, 21.5)
    assert lambda_grid(21500, 100000) == (21500.0, 46400.0, 100000.0)
    assert lambda_grid(0.05, 0.5) == (0.05, 0.108, 0.232, 0.5)  # off the grid: anchored at lo
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        lambda_grid(1, 0.1)


def test_markdown_table_on_hand_numbers():
    t = pd.DataFrame([{"run": "lora", "lambda": math.nan, "n_seeds": 5, "delta_loss_first": 0.2,
                       "delta_loss_first_sd": 0.01, "new_gain": 1.25, "new_gain_sd": 0.5,
                       "d_forget_seed": math.nan, "d_forget_seed_lo": math.nan, "d_forget_seed_hi": math.nan,
                       "d_new_gain_seed": math.nan, "d_new_gain_seed_lo": math.nan,
                       "d_new_gain_seed_hi": math.nan, "seeds_forget_less": 0},
                      {"run": "l2_lam0.1", "lambda": 0.1, "n_seeds": 1, "delta_loss_first": 0.1,
                       "delta_loss_first_sd": math.nan, "new_gain": 1.0, "new_gain_sd": math.nan,
                       "d_forget_seed": -0.1, "d_forget_seed_lo": -0.15, "d_forget_seed_hi": -0.05,
                       "d_new_gain_seed": -0.25, "d_new_gain_seed_lo": math.nan,
                       "d_new_gain_seed_hi": math.nan, "seeds_forget_less": 1}]).set_index("run")
    lines = markdown_table(t, CL_MARKDOWN).splitlines()
    assert lines[0].startswith("| run | λ | n |") and lines[1] == "|" + "---|" * len(CL_MARKDOWN)
    assert lines[2] == "| lora |  | 5 | +0.2000 ± 0.0100 | +1.2500 ± 0.5000 | — | — | 0 |"
    assert lines[3] == ("| l2_lam0.1 | 0.1 | 1 | +0.1000 | +1.0000 | -0.1000 [-0.1500, -0.0500] "
                        "| -0.2500 [one seed: no interval] | 1 |")


def test_the_readme_smoke_table_is_the_table_command_output_pasted():
    """Review defect 7: README tables are pasted command output, not typed. This regenerates
    the smoke table from its committed files and finds it, byte for byte, in docs/usage.md
    (the manual the README links)."""
    results = REPO / "results" / "smoke"
    table = markdown_table(cl_table(results, n_boot=200), CL_MARKDOWN)
    usage = (REPO / "docs" / "usage.md").read_text(encoding="utf-8")
    assert "python -m hybrid_lora table --results results/smoke --markdown" in usage
    assert table in usage, "docs/usage.md's smoke table differs from `table --markdown` on results/smoke"
    assert re.search(r"\| lora \|", table)


def test_matched_gain_against_another_baseline_from_the_command_line(tmp_path, capsys):
    """`table --matched-gain 1.0 --reference dynamic_protect`: l2 is interpolated to the
    baseline's validation gain (1.5: exactly its lambda 0.1 point) and compared with it."""
    from hybrid_lora.cli import main

    for seed, protect_forget in ((1, 0.2), (2, 0.3)):
        _run(tmp_path, "lora", "lora", seed, *_curve(0.6, 2.0, 2.0))
        _run(tmp_path, "dynamic_protect", "dynamic_protect", seed, *_curve(protect_forget, 1.4, 1.5))
        for lam, forget, test_gain, val_gain in ((0.01, 0.3, 1.95, 1.9), (0.1, 0.1, 1.45, 1.5), (1.0, 0.0, 0.5, 0.5)):
            _run(tmp_path, f"l2_lam{lam:g}", "l2", seed, *_curve(forget, test_gain, val_gain), lam=lam)
    assert main(["table", "--results", str(tmp_path), "--matched-gain", "1.0", "--reference",
                 "dynamic_protect", "--markdown", "--n-boot", "10"]) == 0
    out = capsys.readouterr().out
    assert "Δ(Δloss on first) vs dynamic_protect [95% seed CI]" in out
    t = pd.read_csv(tmp_path / "matched_gain.csv").set_index("method")
    assert t.loc["l2", "lambda_star"] == pytest.approx(0.1)
    assert t.loc["l2", "d_forget"] == pytest.approx(((0.1 - 0.2) + (0.1 - 0.3)) / 2)
    assert t.loc["l2", "d_gain"] == pytest.approx(1.45 - 1.4)


def _sequences(out, run, seed, nll_first, nll_new, tokens):
    """eval_sequences.json of a two-domain run: per-sequence NLL sums on the first domain after
    each stage (base, Stage 1, Stage 2) and on the new one; every sequence has `tokens` tokens."""
    entry = lambda nll: {"nll": [float(x) for x in nll], "tokens": [int(x) for x in tokens], "hits": [0] * len(tokens)}  # noqa: E731
    R = [[entry(a), entry(b)] for a, b in zip(nll_first, nll_new)]
    write_json_atomic(run_dir(out, run, seed) / "eval_sequences.json", {"domains": ["imdb", "code"], "R": R})


def test_matched_gain_of_one_seed_has_an_interval_over_evaluation_sequences(tmp_path):
    """One seed has no seed-level interval; d_forget_seq is the interpolated forgetting minus the
    baseline's, bootstrapped over the evaluation sequences. Checked against a slow reference that
    resamples the sequences explicitly with the same draws."""
    rng = np.random.default_rng(3)
    n, tokens = 12, rng.integers(5, 30, size=12)
    stage1 = rng.uniform(1, 3, n) * tokens  # the shared Stage 1 on the first domain
    first = {"lora": stage1 + rng.uniform(0.3, 0.9, n) * tokens, "l2_lam0.01": stage1 + rng.uniform(0.1, 0.5, n) * tokens,
             "l2_lam0.1": stage1 + rng.uniform(0.0, 0.2, n) * tokens}
    curves = {"lora": (0.6, 2.0, 2.0), "l2_lam0.01": (0.3, 1.95, 1.9), "l2_lam0.1": (0.1, 1.45, 1.5)}
    for run, (forget, test_gain, val_gain) in curves.items():
        lam = None if run == "lora" else float(run.split("lam")[1])
        _run(tmp_path, run, run.split("_")[0], 42, *_curve(forget, test_gain, val_gain), lam=lam)
        _sequences(tmp_path, run, 42, [stage1 + tokens, stage1, first[run]], [8 * tokens, 8 * tokens, 6 * tokens], tokens)
    row = matched_gain_table(tmp_path, fraction=0.9, n_boot=300).set_index("method").loc["l2"]
    t = 0.25  # target 1.8, a quarter of the way from 1.9 to 1.5
    assert row["n_seeds"] == 1 and math.isnan(row["d_forget_lo"])

    def delta(run, idx):  # token-weighted forgetting on the sequences idx (with repeats)
        return (first[run][idx].sum() - stage1[idx].sum()) / tokens[idx].sum()

    def diff(idx):
        return (1 - t) * delta("l2_lam0.01", idx) + t * delta("l2_lam0.1", idx) - delta("lora", idx)

    boots = [diff(idx) for idx in np.random.default_rng(0).integers(0, n, size=(300, n))]
    assert row["d_forget_seq"] == pytest.approx(diff(np.arange(n)), rel=1e-12)
    assert row["d_forget_seq_lo"] == pytest.approx(np.quantile(boots, 0.025), rel=1e-12)
    assert row["d_forget_seq_hi"] == pytest.approx(np.quantile(boots, 0.975), rel=1e-12)
    assert row["d_forget_seq_lo"] < row["d_forget_seq"] < row["d_forget_seq_hi"] < 0


def test_matched_gain_without_evaluation_sequences_leaves_the_sequence_interval_empty(tmp_path):
    _run(tmp_path, "lora", "lora", 1, *_curve(0.6, 2.0, 2.0))
    for lam, forget, test_gain, val_gain in ((0.01, 0.3, 1.95, 1.9), (0.1, 0.1, 1.45, 1.5)):
        _run(tmp_path, f"l2_lam{lam:g}", "l2", 1, *_curve(forget, test_gain, val_gain), lam=lam)
    row = matched_gain_table(tmp_path, fraction=0.9).set_index("method").loc["l2"]
    assert row["forget"] == pytest.approx(0.25) and math.isnan(row["d_forget_seq"])


def test_table_reference_alone_is_the_baseline_of_the_continual_learning_table(tmp_path, capsys):
    """Regression: `table --reference lora_r2` (no --matched-gain) was ignored, so every difference
    stayed against `lora`. Hand numbers: new-domain gains 2.0 / 2.2 (lora), 1.8 / 1.9 (lora_r2);
    a name with no runs is an error that lists the runs there."""
    from hybrid_lora.cli import main

    for seed, (gain, gain_r2) in {1: (2.0, 1.8), 2: (2.2, 1.9)}.items():
        _run(tmp_path, "lora", "lora", seed, *_curve(0.5, gain, gain))
        _run(tmp_path, "lora_r2", "lora", seed, *_curve(0.4, gain_r2, gain_r2))
    assert main(["table", "--results", str(tmp_path), "--reference", "lora_r2", "--n-boot", "10", "--markdown"]) == 0
    assert "| Δgain on new vs lora_r2 [95% seed CI] |" in capsys.readouterr().out
    t = pd.read_csv(tmp_path / "cl_table.csv").set_index("run")
    assert t.loc["lora", "d_new_gain_seed"] == pytest.approx(((2.0 - 1.8) + (2.2 - 1.9)) / 2)
    assert t.loc["lora", "d_forget_seed"] == pytest.approx(0.1)
    assert math.isnan(t.loc["lora_r2", "d_new_gain_seed"])
    with pytest.raises(ValueError, match="'lora_r3'.*lora, lora_r2"):
        main(["table", "--results", str(tmp_path), "--reference", "lora_r3", "--debug"])
