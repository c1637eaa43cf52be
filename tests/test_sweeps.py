"""Rank-sweep results: loading with the kept share of the gain, the table, the figure, the CLI."""
import math
import statistics

import matplotlib
import pytest

matplotlib.use("Agg")

from hybrid_lora.cli import main  # noqa: E402
from hybrid_lora.plots import plot_all, plot_rank_sweep  # noqa: E402
from hybrid_lora.results import read_json, run_dir, write_json_atomic  # noqa: E402
from hybrid_lora.analysis.sweep_results import load_sweeps, rank_flex_table, rank_table  # noqa: E402
from hybrid_lora.runs import run_experiment  # noqa: E402

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
    assert sorted(labels) == sorted(["lora (slice, preserve)", "lora (SVD)", "dylora_nested (slice, preserve)"])
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
    assert main(["sweep-ranks", "--run", str(tmp_path)]) == 2
    assert "no config.json there, so not a run folder" in capsys.readouterr().err


def test_rank_sweep_table_leaves_out_per_rank_references_swept_only_at_their_own_rank(swept, tmp_path):
    """Regression: a folder of the rank-flexibility benchmark holds references `lora_r<k>` swept
    at their own rank only; `table --rank-sweep` failed on them ("rank_auc: no share at r_min=1").
    They have no cut, so no row; the other rows are those of the folder without them."""
    import shutil

    shutil.copytree(swept, tmp_path / "with_ref")
    ref = tmp_path / "with_ref" / "lora_r2" / "seed1"
    shutil.copytree(swept / "lora" / "seed1", ref)
    write_json_atomic(ref / "sweep.json", [{"adapter": "final", "adapter_rank": 2, "domain": "B", "kind": "slice",
                                            "scaling": "preserve", "rank": 2, "loss": 4.7, "acc": 0.15}])
    without = rank_flex_table(load_sweeps(swept), "final", "B")
    with_ref = rank_flex_table(load_sweeps(tmp_path / "with_ref"), "final", "B")
    assert "lora_r2" not in set(with_ref["run"])
    assert with_ref.reset_index(drop=True).equals(without.reset_index(drop=True))
    assert main(["table", "--results", str(tmp_path / "with_ref"), "--rank-sweep"]) == 0

def test_rank_flex_table_against_hand_numbers(swept, capsys):
    # loss at rank k = 5 - 0.5 k/4 with base 5.0: the share kept is k/4 for every seed and run
    t = rank_flex_table(load_sweeps(swept), "final", "B").set_index(["run", "kind"])
    row = t.loc[("lora", "slice")]
    assert (row["kept_1"], row["kept_1_lo"], row["kept_1_hi"]) == pytest.approx((0.25, 0.25, 0.25))
    assert row["kept_2"] == pytest.approx(0.5) and row["full_loss"] == pytest.approx(4.5)
    # trapezoids over log2 rank 0..2 of (0.25, 0.5, 1.0), divided by the width 2
    assert row["auc"] == pytest.approx(((0.25 + 0.5) / 2 + (0.5 + 1.0) / 2) / 2)
    assert "kept_4" not in t.columns  # no cut at the largest rank
    assert main(["table", "--results", str(swept), "--rank-sweep", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| run | cut | scaling | n | r | uncut loss | kept at 1 | kept at 2 | loss AUC |" in out
    assert (swept / "rank_table_final_B.csv").exists()


def test_rank_flex_table_interval_is_the_t_interval_over_seeds():
    import pandas as pd

    rows = [{"run": run, "seed": seed, "adapter": "stage1", "domain": "A", "kind": "slice", "scaling": "dylora", "rank": k,
             "adapter_rank": own, "full_loss": 4.0, "loss_gain_kept": share}
            for run, own, per_seed in (("dylora", 4, {1: 0.2, 2: 0.4}), ("dylora_lam0.01", 2, {1: 0.5, 2: 0.5}))
            for seed, share in per_seed.items() for k in (1, 2, 4) if k <= own]
    for r in rows:
        if r["rank"] == r["adapter_rank"]:
            r["loss_gain_kept"] = 1.0
        elif r["rank"] == 2:
            r["loss_gain_kept"] = 0.9
    t = rank_flex_table(pd.DataFrame(rows)).set_index("run")
    # two seeds, shares 0.2 and 0.4: mean 0.3, half-width t_{0.975,1} * s / sqrt(2) = 12.7062 * 0.1
    assert t.at["dylora", "kept_1"] == pytest.approx(0.3)
    assert t.at["dylora", "kept_1_hi"] - 0.3 == pytest.approx(12.7062 * 0.1, rel=1e-4)
    # the rank-2 run is whole from rank 2 on: no share there, and 1.0 on the axis up to 4
    assert math.isnan(t.at["dylora_lam0.01", "kept_2"])
    assert t.at["dylora_lam0.01", "auc"] == pytest.approx(((0.5 + 1.0) / 2 + 1.0) / 2)


def test_rank_flex_table_with_a_reference_uses_its_uncut_gain_per_seed():
    import pandas as pd

    # base loss 5; lora (r=4) uncut 4.0 (seed 1) or 4.5 (seed 2); nested (r=4) uncut 4.5, 4.75 at rank 1
    losses = {("lora", 1): {1: 4.8, 4: 4.0}, ("lora", 2): {1: 4.9, 4: 4.5},
              ("nested", 1): {1: 4.75, 4: 4.5}, ("nested", 2): {1: 4.75, 4: 4.5}}
    rows = [{"run": run, "seed": seed, "adapter": "final", "domain": "B", "kind": "slice", "scaling": "preserve",
             "rank": k, "adapter_rank": 4, "loss": v, "base_loss": 5.0, "full_loss": per[4],
             "loss_gain_kept": (5.0 - v) / (5.0 - per[4])}
            for (run, seed), per in losses.items() for k, v in per.items()]
    t = rank_flex_table(pd.DataFrame(rows), "final", "B", reference="lora").set_index("run")
    # nested's uncut gain 0.5 against lora's 1.0 (seed 1) and 0.5 (seed 2): shares 0.5 and 1.0
    assert t.at["nested", "uncut"] == pytest.approx(0.75)
    assert t.at["nested", "kept_1"] == pytest.approx((0.25 / 1.0 + 0.25 / 0.5) / 2)
    assert t.at["lora", "uncut"] == pytest.approx(1.0)
    # axis log2 rank 0..2 with points at 1 and 4 only: one trapezoid, per seed, then the mean
    assert t.at["nested", "auc"] == pytest.approx(((0.25 + 0.5) / 2 + (0.5 + 1.0) / 2) / 2)
    with pytest.raises(ValueError, match="reference run 'olora'"):
        rank_flex_table(pd.DataFrame(rows), "final", "B", reference="olora")


def test_sweep_on_the_first_n_texts_against_independent_evaluations(tmp_path):
    """sweep_n_eval=5 of 8: every row holds the cut adapter and the base model on the first 5
    evaluation texts (checked by evaluating them here, batched differently); the rows at an
    adapter's own rank come from the R matrix's per-sequence sums, not a second evaluation."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    from hybrid_lora import build_model, evaluate_loss_and_token_acc, load_adapter, rebuild_model_for_new_rank
    from hybrid_lora.adapters import load_tokenizer
    from hybrid_lora.data import make_loaders

    cfg = tiny_config(sweep_ranks=(1, 2, 8), sweep_n_eval=5)
    result = run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    run = run_dir(tmp_path, "lora", 42)
    rows = read_json(run / "sweep.json")
    tok = load_tokenizer(cfg)
    checked = 0
    for d, domain in zip("AB", cfg.domains):
        first = DataLoader(TensorDataset(*make_loaders(cfg, tok, domain, 42).eval.dataset[:5]), batch_size=3)
        base = evaluate_loss_and_token_acc(build_model(cfg)[0], first)  # B = 0: the base model
        for adapter in ("stage1", "final"):
            model = load_adapter(cfg, run / f"adapter_{adapter}")
            for row in (r for r in rows if (r["adapter"], r["domain"]) == (adapter, d)):
                assert row["n_eval"] == 5
                assert row["base_loss"] == pytest.approx(base["loss"], rel=1e-6)
                assert row["base_acc"] == pytest.approx(base["acc"], abs=1e-12)
                if row["kind"] == "svd" and row["rank"] < 8:
                    continue  # SVD cuts are checked against PEFT in test_ranks
                cut = rebuild_model_for_new_rank(copy.deepcopy(model), row["rank"], cfg)
                ev = evaluate_loss_and_token_acc(cut, first)
                assert row["loss"] == pytest.approx(ev["loss"], rel=1e-6), row
                assert row["acc"] == pytest.approx(ev["acc"], abs=1e-12), row
                checked += 1
    assert checked == 2 * 2 * (3 + 1)  # 2 domains x 2 adapters x (3 slices + the uncut SVD row)
    assert math.isfinite(result["metrics"]["rank_auc_loss_final_B"])


def test_validation_texts_are_swept_too(tmp_path):
    """With n_val > 0 the sweep adds domains A_val and B_val, each row holding the base model on
    the validation texts (checked by evaluating it here): lambdas are chosen on these rows."""
    from hybrid_lora import build_model, evaluate_loss_and_token_acc
    from hybrid_lora.adapters import load_tokenizer
    from hybrid_lora.data import make_loaders

    cfg = tiny_config(sweep_ranks=(1, 8), sweep_kinds=("slice",), n_val=4)
    run_experiment(cfg, "lora", 42, tmp_path, progress=False)
    rows = read_json(run_dir(tmp_path, "lora", 42) / "sweep.json")
    assert {r["domain"] for r in rows} == {"A", "B", "A_val", "B_val"}
    tok = load_tokenizer(cfg)
    for d, domain in (("A_val", cfg.domains[0]), ("B_val", cfg.domains[1])):
        base = evaluate_loss_and_token_acc(build_model(cfg)[0], make_loaders(cfg, tok, domain, 42).val)
        for row in (r for r in rows if r["domain"] == d):
            assert row["n_eval"] == 4 and row["base_loss"] == pytest.approx(base["loss"], rel=1e-6)
    metrics = read_json(run_dir(tmp_path, "lora", 42) / "metrics.json")
    own = next(r for r in rows if (r["adapter"], r["domain"], r["rank"]) == ("final", "B_val", 8))
    assert own["loss"] == pytest.approx(metrics["R_val"]["loss"][-1][1], rel=1e-9)  # the uncut adapter, from R_val
