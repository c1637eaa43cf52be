"""Figures are drawn from result files alone; check their content against the files."""
import math
import statistics

import matplotlib
import pytest
from matplotlib.container import BarContainer

matplotlib.use("Agg")

from hybrid_lora.cli import main  # noqa: E402
from hybrid_lora.plots import (plot_cos_to_stage1, plot_method_comparison, plot_stage_history,  # noqa: E402
                               plot_val_curves)
from hybrid_lora.results import load_history, load_summary, read_json, write_json_atomic  # noqa: E402
from conftest import write_fake_run  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Hand-made result files: two methods x two seeds (no training needed)."""
    out = tmp_path_factory.mktemp("res")
    for method, bump in (("lora", 0.0), ("hybrid", 0.05)):
        for seed in (1, 2):
            d = out / method / f"seed{seed}"
            ranks = [8, 8, 8, 4, 2] if method == "hybrid" else [8] * 5
            hist = [{"stage": 1 if i < 2 else 2, "epoch": i + 1 if i < 2 else i - 1, "rank": r,
                     "train_ce": 5 - 0.1 * i, "train_order": 0.0, "train_dc": 0.0,
                     "eval_loss": 5 - 0.1 * i - bump, "eval_acc": 0.1 + 0.01 * i + seed / 100,
                     "cos_to_stage1": None if i < 2 else 1 - 0.05 * i - seed / 100,
                     "trainable_params": 100 * r, "seconds": 1.0} for i, r in enumerate(ranks)]
            ev = lambda acc: {"loss": 5.0 - acc, "acc": acc}  # noqa: E731
            write_fake_run(d, method, seed, {
                "A_base": ev(0.1), "B_base": ev(0.1), "A_after_stage1": ev(0.2 + seed / 100),
                "A_after_stage2": ev(0.15 + bump + seed / 50), "B_after_stage2": ev(0.3 + bump),
                "retention": 1.0, "delta_loss_A": 0.0, "gain_retained": 1.0}, hist)
    return out


def test_method_comparison_bars_are_means_with_sd_over_seeds(results):
    fig = plot_method_comparison(load_summary(results))
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["lora", "hybrid"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:2] == pytest.approx([0.215, 0.215])  # A after Stage 1: mean of .21 and .22
    assert heights[2:4] == pytest.approx([statistics.mean([0.17, 0.19]), statistics.mean([0.22, 0.24])])
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    err = bars[1].errorbar.lines[2][0].get_segments()  # A after Stage 2 error bars
    assert err[0][1][1] - err[0][0][1] == pytest.approx(2 * statistics.stdev([0.17, 0.19]))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == \
        ["A after Stage 1", "A after Stage 2", "B after Stage 2"]


def test_stage_history_marks_every_rank_change(results):
    fig = plot_stage_history(load_history(results), "hybrid", 2)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
        assert [t.get_text() for t in ax.texts] == ["r=8", "r=4", "r=2"]
    acc_line = fig.axes[1].lines[0]
    assert list(acc_line.get_ydata()) == pytest.approx([0.12, 0.13, 0.14, 0.15, 0.16])
    with pytest.raises(ValueError, match="run='dc'"):
        plot_stage_history(load_history(results), "dc", 1)


def test_cos_plot_has_one_line_per_method_over_stage2_epochs(results):
    fig = plot_cos_to_stage1(load_history(results))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Stage-2 epoch" and ax.get_ylabel()
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # ErrorbarContainer: data line first
    assert set(lines) == {"lora", "hybrid"}
    assert list(lines["lora"].get_ydata()) == pytest.approx([1 - 0.1 - 0.015, 1 - 0.15 - 0.015, 1 - 0.2 - 0.015])


def test_stage2_curve_is_the_mean_loss_on_b_per_epoch_with_each_rank_written(results):
    from hybrid_lora.analysis.paper_results import stage2_curve
    from hybrid_lora.plots import plot_stage2_curve

    fig = plot_stage2_curve(stage2_curve(results))
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    assert set(lines) == {"lora (n = 2)", "hybrid (n = 2)"}
    assert list(lines["hybrid (n = 2)"].get_xdata()) == [1, 2, 3]
    # Stage-2 epochs are history rows 2, 3, 4: loss 5 - 0.1 i, hybrid 0.05 lower, equal over seeds
    assert list(lines["hybrid (n = 2)"].get_ydata()) == pytest.approx([4.75, 4.65, 4.55])
    assert list(lines["lora (n = 2)"].get_ydata()) == pytest.approx([4.8, 4.7, 4.6])
    assert sorted(t.get_text() for t in ax.texts) == ["r=2", "r=4"] + ["r=8"] * 4  # hybrid 8, 4, 2; lora 8 x 3
    assert "rank" in ax.get_xlabel() and "loss on B" in ax.get_ylabel()


def test_plot_command_writes_pngs(results, tmp_path, capsys):
    assert main(["plot", "--results", str(results), "--images", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(["methods_acc.png", "methods_loss.png", "cos_to_stage1.png", "pareto.png", "stage2_curve.png"]
                          + [f"history_{m}_seed{s}.png" for m in ("lora", "hybrid") for s in (1, 2)])
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert read_json(results / "lora" / "seed1" / "config.json")["method"] == "lora"  # inputs untouched


def test_derived_metrics_on_hand_numbers():
    from hybrid_lora.results import derived_metrics

    m = {"A_base": {"loss": 5.0, "acc": 0.10}, "A_after_stage1": {"loss": 4.0, "acc": 0.40},
         "A_after_stage2": {"loss": 4.5, "acc": 0.30}}
    d = derived_metrics(m)
    assert d["retention"] == pytest.approx(0.75)
    assert d["delta_loss_A"] == pytest.approx(0.5)
    assert d["gain_retained"] == pytest.approx(0.5)  # kept half of the 1.0 nat gained in Stage 1
    m["A_after_stage1"]["loss"] = 5.0
    assert math.isnan(derived_metrics(m)["gain_retained"])  # Stage 1 gained nothing


def test_method_table_is_mean_and_sample_sd_over_seeds(results):
    from hybrid_lora.results import method_table

    table = method_table(load_summary(results))
    # hybrid: A after Stage 2 acc = 0.15 + 0.05 + seed/50 for seeds 1, 2
    assert table.loc["hybrid", ("A_after_stage2_acc", "mean")] == pytest.approx(0.23)
    assert table.loc["hybrid", ("A_after_stage2_acc", "std")] == pytest.approx(
        statistics.stdev([0.22, 0.24]))
    assert table.loc["lora", ("n_seeds", "")] == 2


def test_metrics_table_and_unfinished_history(results, tmp_path):
    from hybrid_lora.results import metrics_table

    m = read_json(results / "lora" / "seed1" / "metrics.json")
    table = metrics_table(m)
    assert table.loc[("A", "after Stage 1"), "acc"] == m["A_after_stage1"]["acc"]
    assert table.loc[("B", "after Stage 2"), "loss"] == m["B_after_stage2"]["loss"]
    assert len(table) == 5
    assert len(metrics_table({k: m[k] for k in ("A_base", "B_base", "A_after_stage1")})) == 3
    d = tmp_path / "dc" / "seed7"  # a run still in Stage 1: history but no metrics.json
    write_json_atomic(d / "config.json", {"method": "dc", "seed": 7})
    write_json_atomic(d / "history.json", read_json(results / "lora" / "seed1" / "history.json")[:2])
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        load_history(tmp_path)
    partial = load_history(tmp_path, unfinished=True)
    assert list(partial["step"]) == [1, 2] and set(partial["method"]) == {"dc"}


def test_val_curves_draw_each_runs_validation_loss_per_epoch(tmp_path):
    """One line per run and seed with the history's val_loss; runs without validation texts
    (val_loss absent, as in files from before it existed) draw nothing and give no figure."""
    for run, vals in (("lora_lr1e-3", [3.0, 2.9, 2.95]), ("lora_lr3e-4", [3.2, 3.1, 3.05]), ("old", None)):
        hist = [{"stage": 1, "epoch": e + 1, "rank": 8, "train_ce": 3.0, "eval_loss": 3.0, "eval_acc": 0.3,
                 "trainable_params": 1, "seconds": 1.0, **({"val_loss": vals[e]} if vals else {})}
                for e in range(3)]
        ev = {"loss": 3.0, "acc": 0.3}
        write_fake_run(tmp_path / run / "seed42", "lora", 42, {k: ev for k in ("A_base", "B_base", "A_after_stage1",
                                                                          "A_after_stage2", "B_after_stage2")}, hist)
    history = load_history(tmp_path)
    fig = plot_val_curves(history)
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}
    assert lines == {"lora_lr1e-3, seed 42": [3.0, 2.9, 2.95], "lora_lr3e-4, seed 42": [3.2, 3.1, 3.05]}
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel() and fig.axes[0].get_title()
    with pytest.raises(ValueError, match="val_loss"):
        plot_val_curves(history[history["run"] == "old"])
