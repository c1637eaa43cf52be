"""`table --paper`: the paper's table and its claims from hand-made runs whose numbers are known."""
import pytest

from hybrid_lora.analysis.paper_results import paper_claims, paper_table, stage2_curve
from hybrid_lora.analysis.stats import t_quantile
from hybrid_lora.cli import main

from conftest import write_fake_run

# per method: (A after Stage 1, A after Stage 2, B after Stage 2) losses for seed 1; seed 2 adds 0.1,
# seed 3 adds 0.2 to every loss; the base is 5.0 on A and 6.0 on B
RUNS = {"lora": (4.0, 4.5, 5.0), "dc": (4.0, 4.3, 5.1), "dylora": (4.1, 4.6, 5.2), "hybrid": (4.1, 4.4, 5.3),
        "dylora_svdcut": (4.1, 4.5, 5.05)}  # the schedule cut by SVD (`--suffix _svdcut`)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    for run, (a1, a2, b2) in RUNS.items():
        method = run.removesuffix("_svdcut")
        for seed, shift in ((1, 0.0), (2, 0.1), (3, 0.2)):
            ranks = (64, 32, 16) if method in ("dylora", "hybrid") else (64, 64, 64)
            history = [{"stage": 1, "epoch": 1, "rank": 64, "train_ce": 4.0, "eval_loss": a1 + shift,
                        "trainable_params": 640, "cos_to_stage1": None, "seconds": 1.0}]
            history += [{"stage": 2, "epoch": e + 1, "rank": r, "train_ce": 4.0, "eval_loss": b2 + shift + 0.1 * (2 - e),
                         "trainable_params": 10 * r, "cos_to_stage1": 0.9 if method in ("dc", "hybrid") else 0.5 + shift, "seconds": 1.0}
                        for e, r in enumerate(ranks)]
            ev = lambda loss: {"loss": loss, "acc": 1.0 / loss}  # noqa: E731
            write_fake_run(out / run / f"seed{seed}", method, seed,
                           {"A_base": ev(5.0), "B_base": ev(6.0), "A_after_stage1": ev(a1 + shift),
                            "A_after_stage2": ev(a2 + shift), "B_after_stage2": ev(b2 + shift)}, history)
    return out


def test_the_table_has_each_methods_mean_and_t_interval(folder):
    t = paper_table(folder).set_index("run")
    half = t_quantile(0.975, 2) * 0.1 / 3 ** 0.5  # sd of (0, 0.1, 0.2) is 0.1
    assert t.loc["lora", "A_after_stage2_loss"] == pytest.approx(4.6)
    assert t.loc["lora", "A_after_stage2_loss_hi"] == pytest.approx(4.6 + half)
    assert t.loc["dc", "delta_loss_A"] == pytest.approx(0.3) and t.loc["dc", "delta_loss_A_lo"] == pytest.approx(0.3)
    assert t.loc["hybrid", "lora_params"] == 160 and t.loc["lora", "lora_params"] == 640
    assert t.loc["lora", "n_seeds"] == 3


def test_the_claims_are_paired_differences(folder):
    c = paper_claims(folder).set_index(["claim", "runs"])
    row = c.loc[("B loss after Stage 2", "dylora - lora")]
    assert (row["diff"], row["diff_lo"], row["diff_hi"]) == pytest.approx((0.2, 0.2, 0.2))  # paired: no spread
    row = c.loc[("cosine to Stage 1 at the end", "dc - lora")]
    assert row["diff"] == pytest.approx(0.3) and row["diff_lo"] < 0.3 < row["diff_hi"]
    assert c.loc[("forgetting on A (after Stage 2 - after Stage 1)", "hybrid"), "diff"] == pytest.approx(0.3)
    row = c.loc[("B loss after Stage 2", "dylora_svdcut - dylora")]  # paired with its slicing run
    assert (row["diff"], row["diff_lo"], row["diff_hi"]) == pytest.approx((-0.15, -0.15, -0.15))
    assert c.loc[("forgetting on A", "dylora_svdcut - dylora"), "diff"] == pytest.approx(-0.1)
    curve = stage2_curve(folder).set_index(["run", "epoch"])
    assert curve.loc[("hybrid", 3), "rank"] == 16 and curve.loc[("hybrid", 1), "eval_loss"] == pytest.approx(5.6)


def test_the_command_prints_and_writes_the_three_tables(folder, capsys):
    assert main(["table", "--results", str(folder), "--paper", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| lora | 3 | 5.0000 [5.0000, 5.0000] |" in out and "dylora - lora" in out
    assert all((folder / n).exists() for n in ("paper_table.csv", "paper_claims.csv", "stage2_curve.csv"))
