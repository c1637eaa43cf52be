"""Rank-sweep results: loading with the kept share of the gain, the table, the figure, the CLI."""
import statistics

import matplotlib
import pytest

matplotlib.use("Agg")

from hybrid_lora.cli import main  # noqa: E402
from hybrid_lora.plots import plot_all, plot_rank_sweep  # noqa: E402
from hybrid_lora.results import read_json, run_dir, write_json_atomic  # noqa: E402
from hybrid_lora.sweep_results import load_sweeps, rank_table  # noqa: E402
from hybrid_lora.train import run_experiment  # noqa: E402

from conftest import tiny_config, write_fake_run  # noqa: E402


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Hand-made runs: base acc 0.1 on B; adapter rank 4; acc at rank k = 0.1 + 0.1 * k/4 (+ seed)."""
    out = tmp_path_factory.mktemp("sweeps")
    for method in ("lora", "dylora_nested"):
        for seed in (1, 2):
            d = out / method / f"seed{seed}"
            history = [
                {"stage": st, "epoch": 1, "rank": 4, "train_ce": 5.0, "train_order": 0.0, "train_dc": 0.0,
                 "eval_loss": 5.0, "eval_acc": 0.1, "cos_to_stage1": None if st == 1 else 0.9,
                 "trainable_params": 10, "seconds": 1.0} for st in (1, 2)]
            ev = {"loss": 5.0, "acc": 0.1}
            write_fake_run(d, method, seed, {k: ev for k in ("A_base", "B_base", "A_after_stage1",
                                                             "A_after_stage2", "B_after_stage2")}
                           | {"retention": 1.0, "delta_loss_A": 0.0, "gain_retained": 1.0}, history)
            rows = [{"adapter": "final", "adapter_rank": 4, "domain": "B", "kind": kind,
                     "scaling": "preserve", "rank": k, "loss": 5.0 - 0.5 * k / 4,
                     "acc": 0.1 + 0.1 * k / 4 + seed / 100 * (k == 2)}
                    for kind in ("slice", "svd") for k in (1, 2, 4)]
            write_json_atomic(d / "sweep.json", rows)
    return out


def test_gain_kept_is_the_share_of_the_own_rank_gain(swept):
    df = load_sweeps(swept)
    row = df[(df["method"] == "lora") & (df["seed"] == 1) & (df["kind"] == "slice") & (df["rank"] == 1)].iloc[0]
    assert row["gain_kept"] == pytest.approx(0.25) and row["loss_gain_kept"] == pytest.approx(0.25)
    table = rank_table(df, rank=2)
    assert table.loc[("lora", "slice", "preserve"), ("acc", "mean")] == pytest.approx(0.165)
    assert table.loc[("lora", "slice", "preserve"), ("gain_kept", "std")] == pytest.approx(
        statistics.stdev([(0.05 + 0.01) / 0.1, (0.05 + 0.02) / 0.1]))
    assert table.loc[("lora", "svd", "preserve"), ("n_seeds", "")] == 2
    with pytest.raises(ValueError, match="rank 3"):
        rank_table(df, rank=3)


def test_rank_sweep_figure_has_a_line_per_method_and_cut(swept, tmp_path):
    fig = plot_rank_sweep(load_sweeps(swept), "final", "B")
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_xscale() == "log" and loss_ax.get_xlabel() and acc_ax.get_ylabel()
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert sorted(labels) == sorted(["lora (slice, preserve)", "lora (SVD)", "dylora_nested (slice, preserve)",
                                     "dylora_nested (SVD)"])
    line = acc_ax.containers[0].lines[0]
    assert list(line.get_xdata()) == [1, 2, 4]
    assert list(line.get_ydata()) == pytest.approx([0.125, 0.165, 0.2])  # mean over the two seeds
    assert "rank_sweep_final_B.png" in [p.name for p in plot_all(swept, tmp_path)]


def test_sweep_ranks_command_adds_conventions_and_reproduces_the_run(tmp_path, capsys):
    cfg = tiny_config(sweep_ranks=(1, 2, 8), sweep_kinds=("slice",))
    run_experiment(cfg, "hybrid", 42, tmp_path, progress=False)
    run = run_dir(tmp_path, "hybrid", 42)
    in_run = read_json(run / "sweep.json")
    assert {(r["kind"], r["scaling"]) for r in in_run} == {("slice", "preserve")}
    assert main(["sweep-ranks", "--run", str(run), "--scaling", "both", "--kinds", "slice", "svd",
                 "--no-progress"]) == 0
    assert f"written: {run / 'sweep.json'}" in capsys.readouterr().out
    rows = read_json(run / "sweep.json")
    assert {(r["kind"], r["scaling"]) for r in rows} == {("slice", "preserve"), ("slice", "dylora"),
                                                        ("svd", "preserve")}
    again = [r for r in rows if (r["kind"], r["scaling"]) == ("slice", "preserve")]
    key = lambda r: (r["adapter"], r["domain"], r["rank"])  # noqa: E731
    assert sorted(again, key=key) == sorted(in_run, key=key)  # same numbers from the saved adapters
    with pytest.raises(SystemExit, match="no config.json"):
        main(["sweep-ranks", "--run", str(tmp_path)])
