"""The rank-flexibility benchmark table against hand-computed shares, AURAC, time ratios and
the lambda chosen on validation texts."""
import math

import pytest

from hybrid_lora.analysis.rank_flex import aurac, rank_flex_benchmark
from hybrid_lora.results import write_json_atomic

from conftest import write_fake_run

BASE = 5.0
REFERENCE = {1: 4.8, 2: 4.6, 4: 4.2}  # lora_r1, lora_r2 and lora (r = 4) on B, loss
# compared adapters (rank 4) on B: loss at ranks 1, 2, 4; and on B_val
CUTS = {
    "lora": ({1: 4.95, 2: 4.9, 4: 4.2}, {1: 4.95, 2: 4.9, 4: 4.2}),
    "matryoshka": ({1: 4.85, 2: 4.7, 4: 4.3}, {1: 4.85, 2: 4.7, 4: 4.3}),
    "dylora": ({1: 4.9, 2: 4.8, 4: 4.25}, {1: 4.9, 2: 4.8, 4: 4.25}),
    # best on the validation texts, worse on the reported ones: must be chosen anyway
    "dylora_lam0.01": ({1: 4.99, 2: 4.98, 4: 4.9}, {1: 4.81, 2: 4.61, 4: 4.21}),
}
SECONDS = {"lora": 10.0, "lora_r1": 8.0, "lora_r2": 9.0, "matryoshka": 11.0, "dylora": 12.0, "dylora_lam0.01": 12.0}


def rows(adapter_rank, losses, domain, adapter="final"):
    return [{"adapter": adapter, "adapter_rank": adapter_rank, "domain": domain, "kind": "slice",
             "scaling": "preserve", "rank": k, "loss": v, "acc": 0.1 + (BASE - v) / 10,
             "n_eval": 8, "base_loss": BASE, "base_acc": 0.1} for k, v in losses.items()]


@pytest.fixture
def bench(tmp_path):
    ev = {"loss": 5.0, "acc": 0.1}
    metrics = {k: ev for k in ("A_base", "B_base", "A_after_stage1", "A_after_stage2", "B_after_stage2")}
    for seed in (1, 2):
        runs = {"lora_r1": (1, {1: REFERENCE[1]}, {1: REFERENCE[1]}), "lora_r2": (2, {2: REFERENCE[2]}, {2: REFERENCE[2]})}
        runs.update({name: (4, test, val) for name, (test, val) in CUTS.items()})
        for name, (r, test, val) in runs.items():
            d = tmp_path / name / f"seed{seed}"
            method = name.split("_lam")[0].split("_r")[0]
            history = [{"stage": 1, "epoch": 1, "seconds": 1.0, "train_seconds": SECONDS[name] * 3},  # a slowed epoch
                       {"stage": 2, "epoch": 1, "seconds": 1.0, "train_seconds": SECONDS[name]}]
            write_fake_run(d, method, seed, metrics, history)
            write_json_atomic(d / "sweep.json", rows(r, test, "B") + rows(r, val, "B_val")
                              + rows(r, test, "A", "stage1") + rows(r, val, "A_val", "stage1"))
    return tmp_path


def copy_seed1_as_seed3(bench, names):
    """Seed 3 of each run in `names`: a copy of its seed 1 with the seed in config.json changed."""
    import shutil

    for name in names:
        shutil.copytree(bench / name / "seed1", bench / name / "seed3")
        config = bench / name / "seed3" / "config.json"
        config.write_text(config.read_text().replace('"seed": 1', '"seed": 3'))


def test_aurac_by_hand():
    assert aurac({1: 1.0, 2: 1.0, 4: 1.0}) == 1.0
    assert aurac({1: 0.75, 2: 0.75, 4: 0.875}) == pytest.approx(((0.75 + 0.75) / 2 + (0.75 + 0.875) / 2) / 2)
    assert math.isnan(aurac({1: math.nan, 4: 1.0}))


def test_shares_aurac_time_and_the_lambda_chosen_on_validation(bench):
    table, ref = rank_flex_benchmark(bench, "final", "B")
    t = table.set_index("run")
    assert set(t.index) == {"lora", "matryoshka", "dylora", "dylora_lam0.01"}  # references are not compared
    m = t.loc["matryoshka"]
    assert (m["kept_1"], m["kept_2"], m["kept_4"]) == pytest.approx((0.15 / 0.2, 0.3 / 0.4, 0.7 / 0.8))
    assert m["aurac"] == pytest.approx(((0.75 + 0.75) / 2 + (0.75 + 0.875) / 2) / 2)
    assert m["time"] == pytest.approx(1.1) and m["n_seeds"] == 2
    assert t.loc["lora", "kept_4"] == pytest.approx(1.0)  # the reference at its own rank
    assert t.loc["lora", "aurac_acc"] == pytest.approx(t.loc["lora", "aurac"])  # acc = 0.1 + gain / 10
    assert t.loc["dylora_lam0.01", "chosen"] and not t.loc["dylora", "chosen"]
    assert t.loc["matryoshka", "chosen"]
    assert ref.loc[0, "loss_1"] == 4.8 and ref.loc[0, "loss_4"] == 4.2


def test_figure_has_the_chosen_lines_and_the_reference_points(bench):
    import matplotlib
    matplotlib.use("Agg")
    from hybrid_lora.plots import plot_rank_flex

    fig = plot_rank_flex(bench, "final", "B")
    labels = [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert sorted(labels) == ["dylora_lam0.01 (slice)", "lora (slice)", "matryoshka (slice)"]  # not dylora
    points = fig.axes[0].containers[0]  # the errorbar of the references
    assert list(points.lines[0].get_xdata()) == [1, 2, 4]
    assert list(points.lines[0].get_ydata()) == pytest.approx([4.8, 4.6, 4.2])
    assert fig.axes[0].get_xlabel().startswith("rank") and "loss" in fig.axes[0].get_ylabel()


def test_share_figure_draws_the_hand_computed_shares_of_the_chosen_rows(bench, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from hybrid_lora.plots import plot_all, plot_rank_share

    fig = plot_rank_share(bench, "final", "B")
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # one errorbar per row
    aurac_in_label = {label.split(", AURAC ")[0]: float(label.split(", AURAC ")[1]) for label in lines}
    # by hand: lora keeps 0.25, 0.25, 1 (0.4375); dylora_lam0.01 0.05, 0.05, 0.125 (0.06875)
    assert aurac_in_label == pytest.approx({"dylora_lam0.01 (slice)": 0.06875, "lora (slice)": 0.4375,
                                            "matryoshka (slice)": 0.78125}, abs=6e-4)  # not dylora
    m = lines["matryoshka (slice), AURAC 0.781"]
    assert list(m.get_ydata()) == pytest.approx([0.15 / 0.2, 0.3 / 0.4, 0.7 / 0.8])
    assert list(m.get_xdata() / [1, 2, 4]) == pytest.approx([m.get_xdata()[0]] * 3)  # one sideways shift
    assert 0.9 < m.get_xdata()[0] < 1.1
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label().startswith("goal")] == [0.98]
    paths = plot_all(bench, tmp_path / "img", only=("rank_share",))
    assert sorted(p.name for p in paths) == ["rank_share_final_B.png", "rank_share_stage1_A.png"]


def test_table_command_prints_the_chosen_rows_and_writes_every_row(bench, capsys):
    import pandas as pd

    from hybrid_lora.cli import main

    assert main(["table", "--results", str(bench), "--rank-flex", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| matryoshka | slice | 2 | 0.75 [0.75, 0.75] | 0.75 [0.75, 0.75] | 0.88 [0.88, 0.88] | 0.781 [0.781, 0.781]" in out
    assert "| dylora |" not in out and "| dylora_lam0.01 |" in out  # the lambda chosen on validation
    assert "lora trained at each rank, loss: r=1: 4.8000, r=2: 4.6000, r=4: 4.2000" in out
    written = pd.read_csv(bench / "rank_flex_final_B.csv")
    assert sorted(written["run"]) == ["dylora", "dylora_lam0.01", "lora", "matryoshka"]


def test_a_seed_whose_references_are_unfinished_is_left_out(bench):
    """A grid still running: seed 3 has lora and matryoshka but no lora_r1 / lora_r2 yet."""
    copy_seed1_as_seed3(bench, ("lora", "matryoshka"))
    table, ref = rank_flex_benchmark(bench, "final", "B")
    assert (table["n_seeds"] == 2).all() and ref.loc[0, "n_seeds"] == 2
    assert [c for c in table.columns if c.startswith("kept_") and c.count("_") == 1] == ["kept_1", "kept_2", "kept_4"]


def test_a_seed_whose_plain_reference_has_only_svd_rows_is_left_out_with_a_warning(bench):
    """Regression: seed 3 of `lora` swept with `--kinds svd` alone (no slice row at its own
    rank 4) used to vanish from the table without a word; now a warning names the seed and
    the missing rank."""
    from hybrid_lora.results import read_json

    copy_seed1_as_seed3(bench, ("lora_r1", "lora_r2", "lora", "matryoshka"))
    sweep = bench / "lora" / "seed3" / "sweep.json"
    write_json_atomic(sweep, [{**row, "kind": "svd"} for row in read_json(sweep)])
    with pytest.warns(UserWarning, match=r"seed 3 left out .* final B: .* at rank \[4\]"):
        table, ref = rank_flex_benchmark(bench, "final", "B")
    assert (table["n_seeds"] == 2).all() and ref.loc[0, "n_seeds"] == 2


def test_aurac_is_compared_with_svd_of_the_reference_paired_by_seed(bench):
    """Seed 1's SVD cuts keep 0.9, 0.95, 1 of the gain (AURAC 0.95), seed 2's 0.8, 0.9, 1 (0.9);
    matryoshka's AURAC is 0.78125 in both seeds, so the differences are -0.16875 and -0.11875."""
    from hybrid_lora.results import read_json

    svd = {1: {1: 4.82, 2: 4.62, 4: 4.2}, 2: {1: 4.84, 2: 4.64, 4: 4.2}}
    for seed, losses in svd.items():
        path = bench / "lora" / f"seed{seed}" / "sweep.json"
        extra = [dict(row, kind="svd") for row in rows(4, losses, "B")]
        write_json_atomic(path, read_json(path) + extra)
    t = rank_flex_benchmark(bench, "final", "B")[0].set_index(["run", "kind"])
    assert t.loc[("lora", "svd"), "aurac"] == pytest.approx(0.925)
    m = t.loc[("matryoshka", "slice")]
    half = 12.7062047 * (0.05 / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert m["d_aurac"] == pytest.approx(-0.14375)
    assert (m["d_aurac_lo"], m["d_aurac_hi"]) == pytest.approx((-0.14375 - half, -0.14375 + half), abs=1e-6)
    assert t.loc[("lora", "svd"), "d_aurac"] == 0.0
    plain = rank_flex_benchmark(bench, "final", "B", versus="none")[0]  # no such cut: NaN, not 0
    assert plain["d_aurac"].isna().all()


def test_lora_svd_nested_is_timed_by_all_its_epochs(bench):
    """Its nested steps are in its last epoch only: the fastest epoch would hide their cost, so
    its time ratio is the sum of its epochs over the sum of the reference's."""
    import shutil

    for seed in (1, 2):
        d = bench / "lora_svd_nested" / f"seed{seed}"
        shutil.copytree(bench / "lora" / f"seed{seed}", d)
        config = d / "config.json"
        config.write_text(config.read_text().replace('"method": "lora"', '"method": "lora_svd_nested"'))
        write_json_atomic(d / "history.json", [{"stage": 1, "epoch": 1, "seconds": 1.0, "train_seconds": 30.0},
                                               {"stage": 2, "epoch": 1, "seconds": 1.0, "train_seconds": 14.0}])
    t = rank_flex_benchmark(bench, "final", "B")[0].set_index("run")
    assert t.loc["lora_svd_nested", "time"] == pytest.approx((30.0 + 14.0) / (30.0 + 10.0))
    assert t.loc["matryoshka", "time"] == pytest.approx(1.1)  # the others still by their fastest epoch
