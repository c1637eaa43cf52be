"""Experiment tracking (`report_to`): TensorBoard event files read back with TensorBoard's own
reader hold the values of history.json and metrics.json; W&B is mocked at its module boundary
(`wandb.init` / `run.log` / `config.update`), as it is not installed here."""
import sys
import types

import pytest

from hybrid_lora.cli import main
from hybrid_lora.config import ExperimentConfig
from hybrid_lora.results import read_json, run_dir
from hybrid_lora.runs import run_experiment

from conftest import tiny_config

pytest.importorskip("tensorboard", reason="report_to=tensorboard needs the tensorboard package")


def scalars(folder) -> dict:
    """{tag: [(step, value), ...]} of every TensorBoard event file under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A `hybrid` run (CE + ordering; + DC in Stage 2, rank 8 -> 4 -> 2) logged to TensorBoard. Its texts are
    longer than max_length, so every batch has the same number of labelled tokens and the mean
    of the step CEs is the epoch's token-mean CE of history.json."""
    out = tmp_path_factory.mktemp("tb")
    cfg = tiny_config(report_to=("tensorboard",), n_train=16, batch_size=4, lambda_dc=0.5, sweep_ranks=())
    run_experiment(cfg, "hybrid", 42, out, progress=False)
    rd = run_dir(out, "hybrid", 42)
    return cfg, rd, scalars(rd / "tensorboard")


def test_tensorboard_holds_each_step_and_epoch_of_history(tracked):
    cfg, rd, tb = tracked
    history = read_json(rd / "history.json")
    steps_per_epoch = cfg.n_train // cfg.batch_size
    ce = [v for _, v in sorted(tb["train/ce"])]
    assert [s for s, _ in sorted(tb["train/ce"])] == list(range(1, len(history) * steps_per_epoch + 1))
    for i, row in enumerate(history):  # one step axis across both stages
        epoch = ce[i * steps_per_epoch:(i + 1) * steps_per_epoch]
        assert sum(epoch) / len(epoch) == pytest.approx(row["train_ce"], rel=1e-5)
        for term in ("order", "dc"):
            values = [v for s, v in sorted(tb.get(f"train/{term}", [])) if i * steps_per_epoch < s <= (i + 1) * steps_per_epoch]
            mean = sum(values) / len(values) if values else 0.0
            assert mean == pytest.approx(row[f"train_{term}"], rel=1e-5, abs=1e-9)
    assert any(v > 0 for _, v in tb["train/dc"])  # DC in force in Stage 2 only
    assert min(s for s, _ in tb["train/dc"]) > cfg.epochs_stage1 * steps_per_epoch
    evals = dict(tb["eval/loss"])
    for i, row in enumerate(history):
        assert evals[(i + 1) * steps_per_epoch] == pytest.approx(row["eval_loss"], rel=1e-6)
    ranks = {s: v for s, v in tb["train/rank"]}
    assert [ranks[(i + 1) * steps_per_epoch] for i in range(len(history))] == [row["rank"] for row in history]


def test_tensorboard_holds_the_r_matrix_and_the_config(tracked):
    cfg, rd, tb = tracked
    metrics = read_json(rd / "metrics.json")
    a, b = dict(tb["eval/A_loss"]), dict(tb["eval/B_loss"])
    end = (cfg.epochs_stage1 + cfg.epochs_stage2) * (cfg.n_train // cfg.batch_size)
    assert a[0] == pytest.approx(metrics["A_base"]["loss"], rel=1e-6)
    assert b[end] == pytest.approx(metrics["B_after_stage2"]["loss"], rel=1e-6)
    assert a[end] == pytest.approx(metrics["A_after_stage2"]["loss"], rel=1e-6)
    hparams = list((rd / "tensorboard").rglob("hparams.yml"))
    assert hparams and "lambda_dc: 0.5" in hparams[0].read_text() and "method: hybrid" in hparams[0].read_text()


def test_tracking_does_not_change_the_numbers(tracked, tmp_path):
    cfg, rd, _ = tracked
    plain = ExperimentConfig.from_dict({**read_json(rd / "config.json"), "report_to": []})
    run_experiment(plain, "hybrid", 42, tmp_path, progress=False)
    assert (run_dir(tmp_path, "hybrid", 42) / "metrics.json").read_bytes() == (rd / "metrics.json").read_bytes()
    assert not (run_dir(tmp_path, "hybrid", 42) / "tensorboard").exists()


def test_wandb_gets_the_same_steps_through_accelerates_tracker(monkeypatch, tmp_path):
    calls = {"init": [], "log": [], "config": [], "finish": 0}

    class Run:
        def log(self, values, step=None, **kw):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    fake.config = types.SimpleNamespace(update=lambda values, **kw: calls["config"].append(values))
    fake.__version__ = "0.0-mock"
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "my-study")
    assert main(["run", "--preset", "smoke", "--methods", "lora", "--no-progress", "--out", str(tmp_path),
                 "--set", "report_to=wandb", "n_train=16", "n_eval=8", "max_length=32", "batch_size=4",
                 "epochs_stage1=1", "epochs_stage2=1", "rank_schedule=8", "sweep_ranks=4"]) == 0
    assert calls["init"] == [{"project": "my-study", "name": "lora/seed42", "dir": str(run_dir(tmp_path, "lora", 42))}]
    assert calls["config"][0]["method"] == "lora" and calls["config"][0]["seed"] == 42 and calls["finish"] == 1
    history = read_json(run_dir(tmp_path, "lora", 42) / "history.json")
    ce_steps = [s for s, v in calls["log"] if "train/ce" in v]
    assert ce_steps == list(range(1, 2 * 4 + 1))
    epoch_evals = {s: v["eval/loss"] for s, v in calls["log"] if "eval/loss" in v}
    assert [epoch_evals[4], epoch_evals[8]] == pytest.approx([h["eval_loss"] for h in history], rel=1e-9)


def test_report_to_errors_and_none(monkeypatch):
    with pytest.raises(ValueError, match=r"report_to=\('mlflow',\): 'mlflow' is not one of \('tensorboard', 'wandb'\)"):
        tiny_config(report_to=("mlflow",))
    assert tiny_config(report_to="none").report_to == ()
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    from hybrid_lora.tracking import open_tracking

    with pytest.raises(ImportError, match="report_to='wandb' needs the wandb package: pip install wandb"):
        open_tracking(tiny_config(report_to=("wandb",)), None, "x", {})
