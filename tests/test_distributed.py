"""Data parallelism: the command line under torchrun (what `accelerate launch` starts), two
CPU processes on gloo, against one process; and a two-process run killed and resumed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

LAUNCH = str(Path(__file__).with_name("dp_launch.py"))
# tiny LLaMA: no dropout in the base; lora_dropout=0 below, so 1 and 2 processes see the same numbers
ARGS = ["run", "--preset", "smoke", "--model", "tiny-random-llama", "--set", "n_train=32", "n_eval=12",
        "max_length=32", "epochs_stage1=1", "checkpoint_every=2", "--no-progress"]


def launch(out, n_proc: int, args, stop: int = 0) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}"]
    cmd = (torchrun if n_proc > 1 else [sys.executable]) + [LAUNCH, str(stop), *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def numbers(obj, path=""):
    """{json path: number} of every number in a JSON document."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in numbers(val, f"{path}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in numbers(val, f"{path}[{i}]").items()}
    return {path: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def run_numbers(out, method):
    rd = Path(out) / method / "seed42"
    history = [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")}
               for row in json.loads((rd / "history.json").read_text())]
    return {**numbers(json.loads((rd / "metrics.json").read_text()), "metrics"), **numbers(history, "history")}


def assert_close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if not (isinstance(a[k], float) and math.isnan(a[k])):
            assert b[k] == pytest.approx(a[k], rel=rel, abs=rel), k


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    args = ARGS[:-1] + ["lora_dropout=0", "--no-progress", "--methods", "lora", "hybrid", "dynamic"]
    one, two = launch(tmp_path / "one", 1, args), launch(tmp_path / "two", 2, args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    # hybrid: ordering + DC terms and the 8 -> 4 -> 2 rank changes; dynamic: masks from summed moments and gradients
    for method in ("lora", "hybrid", "dynamic"):
        assert_close(run_numbers(tmp_path / "one", method), run_numbers(tmp_path / "two", method), 1e-5)
    assert two.stdout.count("results:") == 1  # only process 0 reports
    assert not list((tmp_path / "two").rglob(".lock")) and not list((tmp_path / "two").rglob("checkpoints"))


def test_a_killed_two_process_run_resumes_to_the_same_numbers(tmp_path):
    """Dropout on (0.3 in LoRA): each process's own dropout stream must come back from the checkpoint."""
    args = ARGS[:-1] + ["lora_dropout=0.3", "--no-progress", "--methods", "hybrid"]
    whole = launch(tmp_path / "whole", 2, args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # 32 texts / batch 8 = 4 steps an epoch; pass 7 of each process: Stage 2, epoch 1, after
    # the checkpoint at step 2
    killed = launch(tmp_path / "resumed", 2, args, stop=7)
    assert killed.returncode != 0 and "interrupted at training forward pass 7" in killed.stderr
    progress = json.loads((tmp_path / "resumed/hybrid/seed42/checkpoints/latest.json").read_text())
    assert (progress["stage"], progress["epoch"], progress["step"]) == (2, 1, 2)
    resumed = launch(tmp_path / "resumed", 2, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(run_numbers(tmp_path / "whole", "hybrid"), run_numbers(tmp_path / "resumed", "hybrid"), 1e-9)
