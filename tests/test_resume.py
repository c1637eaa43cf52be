"""Interrupted runs resume from their checkpoints and end with the numbers of an uninterrupted run."""
import json

import pytest

import hybrid_lora.checkpoint as checkpoint_mod
import hybrid_lora.train as train_mod
from hybrid_lora.results import read_json, run_dir
from hybrid_lora.runs import run_experiment

from conftest import tiny_config

# 16 samples / batch 4 = 4 steps an epoch; Stage 1: 1 epoch, Stage 2: 3 epochs at ranks 8, 4, 2.
# Dropout 0.3 so that a resumed run with the wrong RNG stream would visibly differ; validation
# texts so that R_val is carried through checkpoints too.
STEPS = 4 * (1 + 3)


def config(**changes):
    return tiny_config(**{"lora_dropout": 0.3, "checkpoint_every": 2, "n_val": 4, **changes})


class Interrupt(Exception):
    """Stands in for a Colab disconnect or Ctrl-C."""


def count_training_steps(monkeypatch, stop_at: int | None = None) -> list[int]:
    """Count training forward passes; raise Interrupt on pass `stop_at` (before its update)."""
    calls = [0]
    real = train_mod.causal_lm_sums

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at:
            raise Interrupt(f"interrupted at training step {stop_at}")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "causal_lm_sums", counted)
    return calls


def finished_files(out, method: str, seed: int = 42) -> dict:
    rd = run_dir(out, method, seed)
    history = [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in read_json(rd / "history.json")]
    allocation = (rd / "allocation.json").read_bytes() if (rd / "allocation.json").exists() else None
    return {"metrics": (rd / "metrics.json").read_bytes(), "history": history, "allocation": allocation,
            "adapter": (rd / "adapter_final" / "adapter_model.safetensors").read_bytes(),
            "stage1": (rd / "adapter_stage1" / "adapter_model.safetensors").read_bytes()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    methods = ("hybrid", "lora", "hybrid_nested", "freeze_add", "ewc", "olora", "hybrid_matryoshka",
               "dynamic", "dynamic_protect", "adalora")
    for method in methods:
        run_experiment(config(), method, 42, out, progress=False)
    return {m: finished_files(out, m) for m in methods}


# (method, interruption points, position of the checkpoint the last resume starts from)
CASES = [
    ("hybrid", [3], [1, 1, 2]),        # mid Stage-1 epoch, after the step-2 checkpoint
    ("hybrid", [6], [2, 1, 0]),        # Stage 2, epoch 1: back to the Stage-1/Stage-2 boundary
    ("hybrid", [11], [2, 2, 2]),       # Stage 2 after the rebuild to rank 4, mid-epoch
    ("hybrid", [3, 6], [2, 1, 2]),     # interrupted twice; the second time 2 + 6 steps in
    ("lora", [15], [2, 3, 2]),         # last epoch, rank 2
    ("hybrid_nested", [11], [2, 2, 2]),  # DyLoRA's sampled ranks continue where they stopped
    ("freeze_add", [7], [2, 1, 2]),    # the Stage-1 adapter merged into the base again, new one loaded
    ("ewc", [11], [2, 2, 2]),          # the Fisher is rebuilt from the saved Stage-1 adapter
    ("olora", [6], [2, 1, 0]),         # at the boundary: Stage 2 starts again from its own seed
    ("hybrid_matryoshka", [11], [2, 2, 2]),  # Matryoshka weights of the new rank, DC, after a cut
    ("dynamic", [11], [2, 2, 2]),      # masks, importance averages and schedule position restored
    ("dynamic_protect", [7], [2, 1, 2]),  # revived and frozen components: not revived twice
    ("adalora", [11], [2, 2, 2]),      # PEFT's RankAllocator averages and rank pattern restored
]


@pytest.mark.parametrize("method, stops, position", CASES)
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, method, stops,
                                              position):
    done_before = 0
    for stop in stops:
        count_training_steps(monkeypatch, stop_at=stop)
        with pytest.raises(Interrupt):
            run_experiment(config(), method, 42, tmp_path, progress=False)
        rd = run_dir(tmp_path, method, 42)
        assert not (rd / "metrics.json").exists()
        latest = read_json(rd / "checkpoints" / "latest.json")
        done_before = {1: 0, 2: 4}[latest["stage"]] + 4 * (latest["epoch"] - 1) + latest["step"]
    assert [latest["stage"], latest["epoch"], latest["step"]] == position
    calls = count_training_steps(monkeypatch)
    result = run_experiment(config(), method, 42, tmp_path, progress=False)
    assert result["complete"]
    assert calls[0] == STEPS - done_before  # it resumed: only the missing steps were trained
    assert finished_files(tmp_path, method) == uninterrupted[method]
    assert not (run_dir(tmp_path, method, 42) / "checkpoints").exists()


def test_resume_without_the_saved_rng_state_would_differ(tmp_path, monkeypatch, uninterrupted):
    """The test above is sensitive: skip restoring the RNG state and the dropout masks change."""
    count_training_steps(monkeypatch, stop_at=11)
    with pytest.raises(Interrupt):
        run_experiment(config(), "hybrid", 42, tmp_path, progress=False)
    count_training_steps(monkeypatch)
    monkeypatch.setattr(train_mod, "set_rng_state", lambda state: None)
    run_experiment(config(), "hybrid", 42, tmp_path, progress=False)
    assert finished_files(tmp_path, "hybrid")["metrics"] != uninterrupted["hybrid"]["metrics"]


def test_interruption_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch,
                                                                       uninterrupted):
    real_save, saves = checkpoint_mod.torch.save, [0]

    def failing_save(obj, path, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:  # the second checkpoint: (1, 2, 0), at the end of Stage 1's epoch
            raise Interrupt("interrupted inside save_checkpoint")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, "save", failing_save)
    with pytest.raises(Interrupt):
        run_experiment(config(), "hybrid", 42, tmp_path, progress=False)
    rd = run_dir(tmp_path, "hybrid", 42)
    assert read_json(rd / "checkpoints" / "latest.json")["dir"] == "s1-e1-b2"
    assert (rd / "checkpoints" / "s1-e1-b2" / "state.pt").exists()
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    run_experiment(config(), "hybrid", 42, tmp_path, progress=False)
    assert finished_files(tmp_path, "hybrid") == uninterrupted["hybrid"]


def test_stage1_only_then_stage2_equals_one_call(tmp_path, monkeypatch, uninterrupted):
    first = run_experiment(config(), "hybrid", 42, tmp_path, progress=False, stop_after_stage=1)
    rd = run_dir(tmp_path, "hybrid", 42)
    assert not first["complete"] and set(first["metrics"]) == {"A_base", "B_base", "A_after_stage1"}
    assert [h["stage"] for h in read_json(rd / "history.json")] == [1]
    assert (rd / "adapter_stage1" / "adapter_model.safetensors").exists()
    calls = count_training_steps(monkeypatch)
    again = run_experiment(config(), "hybrid", 42, tmp_path, progress=False, stop_after_stage=1)
    assert calls[0] == 0 and again["metrics"] == first["metrics"]  # Stage 1 is not trained twice
    run_experiment(config(), "hybrid", 42, tmp_path, progress=False)
    assert calls[0] == 12
    assert finished_files(tmp_path, "hybrid") == uninterrupted["hybrid"]


def test_complete_runs_are_skipped_and_other_settings_are_refused(tmp_path, monkeypatch):
    run_experiment(config(), "lora", 42, tmp_path, progress=False)
    calls = count_training_steps(monkeypatch)
    again = run_experiment(config(checkpoint_every=5), "lora", 42, tmp_path, progress=False)
    assert calls[0] == 0 and again["complete"]
    metrics = json.loads((run_dir(tmp_path, "lora", 42) / "metrics.json").read_text())
    assert again["metrics"] == metrics
    with pytest.raises(ValueError, match=r"lambda_dc: saved 0\.1, now 0\.5"):
        run_experiment(config(lambda_dc=0.5), "lora", 42, tmp_path, progress=False)


def test_cli_run_killed_mid_epoch_resumes_to_the_same_numbers(tmp_path):
    """A real interruption: SIGKILL the CLI process once a mid-epoch checkpoint exists."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from hybrid_lora.cli import build_parser, config_from_args

    argv = ["run", "--preset", "smoke", "--methods", "hybrid", "--set", "checkpoint_every=3",
            "--no-progress", "--out"]
    reference = tmp_path / "reference"
    run_experiment(config_from_args(build_parser().parse_args(argv + [str(reference)])), "hybrid",
                   42, reference, progress=False)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_lora", *argv, str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run_dir(out, "hybrid", 42) / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and read_json(latest)["stage"] == 2 and read_json(latest)["step"] > 0:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir(out, "hybrid", 42) / "metrics.json").exists()
    done = subprocess.run([sys.executable, "-m", "hybrid_lora", *argv, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert finished_files(out, "hybrid") == finished_files(reference, "hybrid")


def test_stage2_settings_may_change_between_stage1_and_stage2_only(tmp_path, uninterrupted):
    run_experiment(config(), "hybrid", 42, tmp_path, progress=False, stop_after_stage=1)
    with pytest.raises(ValueError, match="lambda_order"):  # Stage 1 used it: refused
        run_experiment(config(lambda_order=0.5), "hybrid", 42, tmp_path, progress=False)
    changed = run_experiment(config(lambda_dc=0.5), "hybrid", 42, tmp_path, progress=False)
    assert read_json(run_dir(tmp_path, "hybrid", 42) / "config.json")["lambda_dc"] == 0.5
    reference = tmp_path / "reference"
    expected = run_experiment(config(lambda_dc=0.5), "hybrid", 42, reference, progress=False)
    assert changed["metrics"] == expected["metrics"]
    assert changed["metrics"] != json.loads(uninterrupted["hybrid"]["metrics"])
    with pytest.raises(ValueError, match="lambda_dc"):  # once Stage 2 has run, it is fixed
        run_experiment(config(lambda_dc=0.1), "hybrid", 42, tmp_path, progress=False)


def test_a_stale_lock_of_another_machine_is_taken_over_and_the_run_resumes(tmp_path, monkeypatch, uninterrupted):
    """A new Colab runtime is a new host: the lock its dead predecessor left on Drive counts as
    stale once not refreshed for LEASE_STALE_S, and the run resumes to the uninterrupted numbers;
    a lock refreshed just now by a live holder elsewhere is refused, saying when it goes stale."""
    import time

    count_training_steps(monkeypatch, stop_at=11)
    with pytest.raises(Interrupt):
        run_experiment(config(), "hybrid", 42, tmp_path, progress=False)
    lock = run_dir(tmp_path, "hybrid", 42) / checkpoint_mod.LOCK
    holder = {"host": "colab-runtime-gone", "pid": 1, "since": "2026-12-01 10:00:00", "token": "x"}
    lock.write_text(json.dumps({**holder, "refreshed": time.time() - 60}))
    with pytest.raises(checkpoint_mod.RunLocked, match=r"refreshed 1\.0 min ago.*stale in 9\.0 min"):
        run_experiment(config(), "hybrid", 42, tmp_path, progress=False)
    lock.write_text(json.dumps({**holder, "refreshed": time.time() - checkpoint_mod.LEASE_STALE_S - 1}))
    count_training_steps(monkeypatch)
    assert run_experiment(config(), "hybrid", 42, tmp_path, progress=False)["complete"]
    assert finished_files(tmp_path, "hybrid") == uninterrupted["hybrid"]
    assert not lock.exists()


def test_the_holder_refreshes_its_lease_and_leaves_a_lock_taken_from_it(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(checkpoint_mod, "LEASE_REFRESH_S", 0.05)
    rd = tmp_path / "run"
    with checkpoint_mod.run_lock(rd):
        first = json.loads((rd / checkpoint_mod.LOCK).read_text())
        time.sleep(0.3)
        later = json.loads((rd / checkpoint_mod.LOCK).read_text())
        assert later["token"] == first["token"] and later["refreshed"] > first["refreshed"]
        other = {**later, "token": "someone-else", "refreshed": 0.0}
        (rd / checkpoint_mod.LOCK).write_text(json.dumps(other))  # taken over meanwhile
        time.sleep(0.2)
        assert json.loads((rd / checkpoint_mod.LOCK).read_text()) == other  # not overwritten
    assert json.loads((rd / checkpoint_mod.LOCK).read_text()) == other  # nor deleted on release
