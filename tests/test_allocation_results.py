"""The allocation study's table and rank maps, from hand-written result folders."""
import dataclasses

import pytest

from hybrid_lora.analysis.allocation_results import allocation_table, rank_maps
from hybrid_lora.config import ExperimentConfig
from hybrid_lora.results import write_json_atomic

from conftest import write_fake_run

T_975_DF1 = 12.706204736174703  # t quantile, 1 degree of freedom


def evals(a1, b2, a2):
    return {"A_base": {"loss": 5.0, "acc": 0.1}, "B_base": {"loss": 6.0, "acc": 0.05},
            "A_after_stage1": {"loss": a1, "acc": 0.3}, "B_after_stage2": {"loss": b2, "acc": 0.2},
            "A_after_stage2": {"loss": a2, "acc": 0.25}}


def history(params, train_seconds=(1.0, 1.0)):
    return [{"stage": s, "epoch": 1, "trainable_params": params, "seconds": 1.0, "train_seconds": t}
            for s, t in zip((1, 2), train_seconds)]


@pytest.fixture
def study(tmp_path):
    cfg = dataclasses.replace(ExperimentConfig.smoke(), r=16, rank_schedule=(8, 8, 8))
    for seed, (base_a1, dyn_a1, svd_a1) in {1: (4.0, 3.9, 4.1), 2: (4.2, 4.0, 4.2)}.items():
        for method, a1, params in (("lora_small", base_a1, 800), ("dynamic", dyn_a1, None), ("lora", 4.5, 1600)):
            d = tmp_path / method / f"seed{seed}"
            seconds = {"dynamic": (1.3, 1.1 + 0.2 * (seed - 1)), "lora": (2.0, 1.0)}.get(method, (1.0, 1.0))
            write_fake_run(d, method, seed, evals(a1, 5.0, 4.6), history(params or 1600, seconds))
            write_json_atomic(d / "config.json", {**cfg.to_dict(), "method": method, "seed": seed})
        write_json_atomic(tmp_path / "dynamic" / f"seed{seed}" / "allocation.json", {
            "schema_version": 1, "modules": ["m0", "m1"], "costs": [10, 20],
            "epochs": [{"stage": 1, "epoch": 1, "ranks": [8, 2 * seed], "params": 790, "frozen_params": 0},
                       {"stage": 2, "epoch": 1, "ranks": [4, 6], "params": 780, "frozen_params": 5}]})
        write_json_atomic(tmp_path / "lora" / f"seed{seed}" / "sweep.json", [
            {"adapter": a, "domain": dom, "kind": "svd_alloc", "scaling": "preserve", "rank": 8,
             "loss": svd_a1 if (a, dom) == ("stage1", "A") else 5.1, "acc": 0.2}
            for a, dom in (("stage1", "A"), ("final", "B"), ("final", "A"))])
    return tmp_path


def test_differences_from_the_uniform_baseline_with_seed_intervals(study):
    t = allocation_table(study).set_index("run")
    assert set(t.index) == {"lora_small", "dynamic", "lora svd_alloc@8"}
    dyn = t.loc["dynamic"]
    diffs = [3.9 - 4.0, 4.0 - 4.2]  # per seed, by hand
    mean, sd = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / 2 ** 0.5
    assert dyn["stage1_first_loss"] == pytest.approx((3.9 + 4.0) / 2)
    assert dyn["stage1_first_loss_diff"] == pytest.approx(mean)
    assert dyn["stage1_first_loss_lo"] == pytest.approx(mean - T_975_DF1 * sd / 2 ** 0.5)
    assert dyn["params_stage1"] == 790 and dyn["params_final"] == 785  # frozen ones count
    svd = t.loc["lora svd_alloc@8"]
    assert svd["stage1_first_loss_diff"] == pytest.approx(((4.1 - 4.0) + (4.2 - 4.2)) / 2)
    assert svd["final_last_loss"] == pytest.approx(5.1)
    assert svd["params_final"] == 800  # the budget: plain LoRA's 1600 parameters x 8 / 16
    assert t.loc["lora_small", "stage1_first_loss_diff"] == 0.0
    # time: fastest epoch over plain LoRA's (1.0), per seed 1.1 and 1.3
    assert dyn["time"] == pytest.approx(1.2)
    assert dyn["time_hi"] == pytest.approx(1.2 + T_975_DF1 * (0.2 / 2 ** 0.5) / 2 ** 0.5)
    assert t.loc["lora_small", "time"] == pytest.approx(1.0) and svd["time"] != svd["time"]  # NaN: no training


def test_allocation_markdown_shows_the_time_ratio(study):
    from hybrid_lora.analysis.allocation_results import allocation_markdown

    half = T_975_DF1 * (0.2 / 2 ** 0.5) / 2 ** 0.5
    lines = {line.split(" | ")[0]: line for line in allocation_markdown(allocation_table(study)).splitlines()}
    assert lines["| dynamic"].endswith(f"| 1.20 [{1.2 - half:.2f}, {1.2 + half:.2f}] |")
    assert lines["| lora svd_alloc@8"].endswith("| — |")


def test_a_one_domain_study_has_its_one_point_and_its_swept_cut(tmp_path):
    """The allocation study on one domain (SmolLM2 on code): each run's loss is R's last row, the
    baseline may be a `--ranks` reference (lora_r2), and LoRA's cut is its adapter swept as
    "stage1" on "A"; the markdown shows that one point only. Hand numbers, two seeds."""
    from hybrid_lora.analysis.allocation_results import allocation_markdown
    from hybrid_lora.results import run_metrics

    cfg = dataclasses.replace(ExperimentConfig.smoke(), domains=("code",), r=16, rank_schedule=(2, 2, 2))
    losses = {"lora_r2": (2.52, 2.50), "dynamic": (2.51, 2.47), "lora": (2.49, 2.48)}
    for seed in (1, 2):
        for method, per_seed in losses.items():
            d = tmp_path / method / f"seed{seed}"
            after = per_seed[seed - 1]
            write_json_atomic(d / "config.json", {**cfg.to_dict(), "method": method, "seed": seed,
                                                  "r": 2 if method == "lora_r2" else 16})
            write_json_atomic(d / "history.json", [{"stage": 1, "epoch": 1, "trainable_params": 100,
                                                    "seconds": 1.0, "train_seconds": 1.0}])
            write_json_atomic(d / "metrics.json", run_metrics(("code",), [[2.8], [after]], [[0.4], [0.5]]))
        write_json_atomic(tmp_path / "dynamic" / f"seed{seed}" / "allocation.json", {
            "schema_version": 1, "modules": ["m0"], "costs": [10],
            "epochs": [{"stage": 1, "epoch": 1, "ranks": [2], "params": 90, "frozen_params": 0}]})
        write_json_atomic(tmp_path / "lora" / f"seed{seed}" / "sweep.json", [
            {"adapter": "stage1", "domain": "A", "kind": "svd", "scaling": "preserve", "rank": 2,
             "loss": 2.53 + 0.01 * seed, "acc": 0.45}])
    t = allocation_table(tmp_path, baseline="lora_r2").set_index("run")
    assert set(t.index) == {"lora_r2", "dynamic", "lora svd@2"}
    assert "stage1_first_loss" not in t.columns
    assert t.loc["dynamic", "final_last_loss_diff"] == pytest.approx(((2.51 - 2.52) + (2.47 - 2.50)) / 2)
    assert t.loc["lora svd@2", "final_last_loss_diff"] == pytest.approx(((2.54 - 2.52) + (2.55 - 2.50)) / 2)
    assert t.loc["lora svd@2", "params_final"] == 100 * 2 / 16 and t.loc["dynamic", "params_final"] == 90
    head = allocation_markdown(t.reset_index()).splitlines()[0]
    assert head == "| run | n | final_last loss | params (final) | time / LoRA at r [95% CI] |"


def test_rank_maps_average_the_seeds(study):
    maps = rank_maps(study, "dynamic")
    assert maps["epochs"] == [(1, 1), (2, 1)] and maps["modules"] == ["m0", "m1"]
    assert maps["ranks"] == [[8, 3], [4, 6]]  # (2 + 4) / 2 = 3


def test_a_missing_baseline_is_named(study):
    with pytest.raises(FileNotFoundError, match="'adalora'"):
        allocation_table(study, baseline="adalora")


def test_rank_map_figure_shows_the_averaged_ranks(study, tmp_path_factory):
    import numpy as np

    from hybrid_lora.plots import plot_all, plot_rank_map

    fig = plot_rank_map(rank_maps(study, "dynamic"), "dynamic")
    ax = fig.axes[0]
    assert np.array_equal(ax.images[0].get_array(), np.array([[8, 4], [3, 6]]))  # module x epoch
    assert ax.get_xlabel() and ax.get_ylabel() and [t.get_text() for t in ax.get_yticklabels()] == ["m0", "m1"]
    images = tmp_path_factory.mktemp("images")
    assert [p.name for p in plot_all(study, images, only=("rank_map",))] == ["rank_map_dynamic.png"]


def _per_input_runs(tmp_path):
    """Two seeds of per_input.json with hand-written losses (feature, fixed, random) at average 3."""
    for seed, (feat, fixed, rand) in {1: (4.0, 4.1, 4.05), 2: (4.2, 4.2, 4.3)}.items():
        d = tmp_path / "matryoshka" / f"seed{seed}"
        write_fake_run(d, "matryoshka", seed, evals(4.0, 5.0, 4.5), history(100))
        rows = [{"domain": "yelp", "policy": p, "target_avg": 3, "avg_rank": 3.0, "loss": v, "acc": 0.1}
                for p, v in (("feature", feat), ("fixed", fixed), ("random", rand))]
        write_json_atomic(d / "per_input.json", {"schema_version": 1, "rows": rows})


def test_per_input_table_pairs_the_policies_by_seed(tmp_path):
    _per_input_runs(tmp_path)
    from hybrid_lora.analysis.allocation_results import per_input_table

    row = per_input_table(tmp_path, "matryoshka").iloc[0]
    assert row["n_seeds"] == 2 and row["feature_loss"] == pytest.approx(4.1)
    assert row["feature_vs_fixed_loss"] == pytest.approx((-0.1 + 0.0) / 2)
    assert row["feature_vs_random_loss"] == pytest.approx((-0.05 - 0.1) / 2)
    half = T_975_DF1 * abs(-0.05 + 0.1) / 2 ** 0.5 / 2 ** 0.5
    assert row["feature_vs_random_loss_hi"] == pytest.approx(-0.075 + half)


def test_per_input_table_command(tmp_path, capsys):
    """`table --per-input matryoshka --markdown` prints the paired differences of the hand numbers
    above (feature - fixed: -0.1 and 0.0; t-interval with t(0.975, 1))."""
    import pandas as pd

    from hybrid_lora.cli import main

    _per_input_runs(tmp_path)
    assert main(["table", "--results", str(tmp_path), "--per-input", "matryoshka", "--markdown"]) == 0
    out = capsys.readouterr().out
    half = T_975_DF1 * 0.1 / 2 ** 0.5 / 2 ** 0.5
    assert f"| yelp | 3 | 2 | 3.00 | 4.1500 | 4.1000 | -0.0500 [{-0.05 - half:+.4f}, {-0.05 + half:+.4f}] |" in out
    assert pd.read_csv(tmp_path / "per_input_table.csv")["feature_vs_fixed_loss"].iloc[0] == pytest.approx(-0.05)


def test_per_input_figure_shows_the_paired_differences(tmp_path, tmp_path_factory):
    """The bottom panel plots feature - fixed and feature - random of the hand numbers above:
    means -0.05 and -0.075, with the t-interval as error bars."""
    import numpy as np

    from hybrid_lora.analysis.allocation_results import per_input_table
    from hybrid_lora.plots import plot_all, plot_per_input

    _per_input_runs(tmp_path)
    fig = plot_per_input(per_input_table(tmp_path, "matryoshka"), "matryoshka")
    top, bottom = fig.axes[0], fig.axes[1]
    assert np.allclose([line.get_ydata()[0] for line in top.get_lines()], [4.15, 4.1, 4.175])  # fixed, feature, random
    means = [c.lines[0].get_ydata()[0] for c in bottom.containers]
    assert np.allclose(means, [-0.05, -0.075])
    half = T_975_DF1 * 0.1 / 2 ** 0.5 / 2 ** 0.5
    bar = bottom.containers[0].lines[2][0].get_segments()[0]  # feature - fixed: [lo, hi] at x = 3 / 1.04
    assert np.allclose(bar[:, 1], [-0.05 - half, -0.05 + half])
    assert bottom.get_xlabel() and bottom.get_ylabel() and top.get_ylabel()
    images = tmp_path_factory.mktemp("images")
    assert [p.name for p in plot_all(tmp_path, images, only=("per_input",))] == ["per_input_matryoshka.png"]
