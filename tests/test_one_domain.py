"""A run on one domain (`domains=code`): Stage 1 only, its adapter swept as the Stage-1 adapter
on A (as a two-domain run's), the rank-flexibility table and the figures made from it; what a
per-domain rank study needs without paying for a Stage 2."""
import dataclasses
import math

import pytest

from hybrid_lora.cli import main
from hybrid_lora.results import load_summary, read_json, run_dir
from hybrid_lora.runs import run_experiment

from conftest import tiny_config


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    cfg = tiny_config(domains=("code",), n_val=4, sweep_ranks=(1, 2, 4), sweep_kinds=("slice", "svd"))
    for method in ("lora", "matryoshka"):
        run_experiment(cfg, method, 42, out, progress=False)
    for k in (1, 2, 4):
        from hybrid_lora.grid import at_rank

        run_experiment(at_rank(cfg, k), "lora", 42, out, progress=False, name=f"lora_r{k}")
    return cfg, out


def test_a_one_domain_run_evaluates_and_sweeps_its_adapter_on_a(one):
    cfg, out = one
    rd = run_dir(out, "lora", 42)
    metrics = read_json(rd / "metrics.json")
    assert metrics["R"]["domains"] == ["code"] and len(metrics["R"]["loss"]) == 2  # base, after Stage 1
    assert metrics["R"]["loss"][1][0] < metrics["R"]["loss"][0][0]
    assert not (rd / "adapter_stage1").exists() and (rd / "adapter_final").is_dir()
    rows = read_json(rd / "sweep.json")
    assert {(r["adapter"], r["domain"]) for r in rows} == {("stage1", "A"), ("stage1", "A_val")}
    own = [r for r in rows if r["domain"] == "A" and r["rank"] == 8 and r["kind"] == "svd"]
    assert own[0]["loss"] == pytest.approx(metrics["R"]["loss"][1][0])  # the uncut adapter: R's entry
    assert not math.isnan(metrics["rank_auc_loss_stage1_A"])
    assert [h["stage"] for h in read_json(rd / "history.json")] == [1] * cfg.epochs_stage1
    summary = load_summary(out)
    assert set(summary["run"]) == {"lora", "matryoshka", "lora_r1", "lora_r2", "lora_r4"}


def test_the_rank_flex_table_and_figures_of_one_domain_runs(one, capsys, tmp_path):
    cfg, out = one
    assert main(["table", "--results", str(out), "--rank-flex"]) == 0
    printed = capsys.readouterr().out
    assert "Stage-1 adapter on A" in printed and "Final adapter on B" not in printed
    assert (out / "rank_flex_stage1_A.csv").exists()
    assert main(["plot", "--results", str(out), "--images", str(tmp_path / "img")]) == 0
    assert any(p.suffix == ".png" for p in (tmp_path / "img").iterdir())


def test_export_and_resweep_of_a_one_domain_run(one, tmp_path):
    cfg, out = one
    rd = run_dir(out, "lora", 42)
    assert main(["sweep-ranks", "--run", str(rd), "--ranks", "3", "--kinds", "svd"]) == 0
    assert any(r["rank"] == 3 and r["adapter"] == "stage1" for r in read_json(rd / "sweep.json"))
    assert main(["export", str(rd), "--rank", "2", "--out", str(tmp_path / "x")]) == 0


def test_a_run_made_without_a_sweep_is_swept_on_its_validation_texts_too(tmp_path):
    """Regression: `sweep-ranks` swept only the evaluation texts, so per-rank references made with
    sweep_ranks=() and swept afterwards had no A_val rows, and the rank-flex table beside a
    method swept in its run (on A and A_val) failed choosing lambdas on A_val. Now the resweep
    of a run made without a sweep gives the rows the run's own sweep gives, validation included."""
    from hybrid_lora.grid import at_rank

    swept = tiny_config(domains=("code",), n_val=4, sweep_ranks=(1, 2), sweep_kinds=("slice", "svd"))
    bare = dataclasses.replace(swept, sweep_ranks=(), sweep_kinds=())
    run_experiment(swept, "lora", 42, tmp_path / "in_run", progress=False)
    run_experiment(swept, "matryoshka", 42, tmp_path / "later", progress=False)
    for name, cfg in (("lora", bare), ("lora_r1", at_rank(bare, 1)), ("lora_r2", at_rank(bare, 2))):
        run_experiment(cfg, "lora", 42, tmp_path / "later", progress=False, name=name)
        ranks = [str(cfg.r)] if name != "lora" else ["1", "2"]
        assert main(["sweep-ranks", "--run", str(run_dir(tmp_path / "later", name, 42)), "--ranks", *ranks,
                     "--kinds", "slice", "svd", "--no-progress"]) == 0
    key = lambda r: (r["domain"], r["kind"], r["rank"])  # noqa: E731
    rows = lambda out: sorted(read_json(run_dir(out, "lora", 42) / "sweep.json"), key=key)  # noqa: E731
    assert {r["domain"] for r in rows(tmp_path / "later")} == {"A", "A_val"}
    for a, b in zip(rows(tmp_path / "in_run"), rows(tmp_path / "later"), strict=True):
        assert key(a) == key(b) and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert main(["table", "--results", str(tmp_path / "later"), "--rank-flex"]) == 0

def test_each_epoch_is_evaluated_on_the_validation_texts(tmp_path):
    """The curve an epoch count is chosen on: epoch 1's `val_loss` of a 2-epoch run is R_val of
    a 1-epoch run with the same seed (a constant learning rate: the same model after epoch 1);
    the last epoch's is the run's own R_val entry. Without validation texts both stay None."""
    cfg = tiny_config(domains=("code",), n_val=4, epochs_stage1=2, sweep_ranks=())
    two = run_experiment(cfg, "lora", 42, tmp_path / "two", progress=False)
    one = run_experiment(tiny_config(domains=("code",), n_val=4, epochs_stage1=1, sweep_ranks=()), "lora", 42,
                         tmp_path / "one", progress=False)
    r_val = lambda out: read_json(run_dir(out, "lora", 42) / "metrics.json")["R_val"]["loss"][1][0]  # noqa: E731
    assert [h["val_loss"] for h in two["history"]] == pytest.approx([r_val(tmp_path / "one"), r_val(tmp_path / "two")],
                                                                    rel=1e-6)
    assert two["history"][0]["val_loss"] != pytest.approx(two["history"][1]["val_loss"], rel=1e-6)
    plain = run_experiment(tiny_config(domains=("code",), sweep_ranks=()), "lora", 42, tmp_path / "none", progress=False)
    assert [(h["val_loss"], h["val_acc"]) for h in plain["history"]] == [(None, None)]


def test_the_validation_point_leaves_the_training_stream_alone(tmp_path, monkeypatch):
    """The per-epoch validation point draws no random number the training uses (LoRA dropout
    in epoch 2 is that of a run without it): the same losses and the same R."""
    import hybrid_lora.runs as runs

    cfg = tiny_config(domains=("code",), n_val=4, epochs_stage1=2, sweep_ranks=())
    assert cfg.lora_dropout > 0  # dropout is what reads the stream
    with_val = run_experiment(cfg, "lora", 42, tmp_path / "with", progress=False)
    real = runs.train_stage
    monkeypatch.setattr(runs, "train_stage", lambda *a, **k: real(*a, **{**k, "val_loader": None}))
    without = run_experiment(cfg, "lora", 42, tmp_path / "without", progress=False)
    assert with_val["history"][0]["val_loss"] is not None and without["history"][0]["val_loss"] is None
    assert [h["train_ce"] for h in with_val["history"]] == [h["train_ce"] for h in without["history"]]
    assert with_val["metrics"]["R"] == without["metrics"]["R"]
