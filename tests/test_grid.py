"""Grids of runs split into shards (--shard I/N, SLURM job arrays) and the run-folder lock."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from hybrid_lora.checkpoint import LOCK, RunLocked, run_lock
from hybrid_lora.grid import grid, parse_shard, run_all, shard_from_env, take_shard
from hybrid_lora.results import run_dir
from hybrid_lora.runs import run_experiment

from conftest import tiny_config


def names(runs):
    return [(name, seed) for name, _, seed, _ in runs]


def test_shards_partition_the_grid_in_seed_major_blocks():
    cfg = tiny_config(methods=("lora", "dc", "l2"), seeds=(1, 2, 3))
    runs = grid(cfg, {"dc": (cfg.lambda_dc, 1.0)})
    # the lambda value equal to cfg's own is the plain "dc" run, listed once
    assert names(runs)[:4] == [("lora", 1), ("dc", 1), ("l2", 1), ("dc_lam1", 1)]
    assert len(runs) == 4 * 3
    for count in (1, 2, 5, 12, 13):
        shards = [names(take_shard(runs, i, count)) for i in range(count)]
        assert [r for s in shards for r in s] == names(runs)  # disjoint, complete, in order
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="shard 2/2"):
        take_shard(runs, 2, 2)


def test_parse_shard_and_slurm_arrays():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "1-8", "a/2", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    assert shard_from_env({}) is None
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "4"}
    assert shard_from_env(env) == (2, 4)
    with pytest.raises(ValueError, match="contiguous"):
        shard_from_env({**env, "SLURM_ARRAY_TASK_MAX": "7"})  # --array=1-7:2


def test_two_shards_one_after_the_other_equal_one_unsharded_call(tmp_path):
    cfg = tiny_config(methods=("lora", "dc"), seeds=(1, 2), sweep_ranks=(), sweep_kinds=())
    lambdas = {"dc": (0.5,)}
    whole = run_all(cfg, tmp_path / "whole", progress=False, lambdas=lambdas)
    first = run_all(cfg, tmp_path / "sharded", progress=False, lambdas=lambdas, shard=(0, 2))
    second = run_all(cfg, tmp_path / "sharded", progress=False, lambdas=lambdas, shard=(1, 2))
    assert len(first) + len(second) == len(whole) == 6
    sharded, unsharded = (pd.read_csv(tmp_path / d / "summary.csv").drop(columns="seconds")  # wall time
                          for d in ("sharded", "whole"))
    pd.testing.assert_frame_equal(sharded, unsharded, check_exact=True)
    assert len(sharded) == 6
    # each run of the second shard is new: the first shard did not touch it
    assert {(r["method"], r["seed"]) for r in first}.isdisjoint({(r["method"], r["seed"]) for r in second})


def test_cli_runs_the_slurm_array_task_share(tmp_path, monkeypatch):
    from hybrid_lora.cli import main

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    args = ["run", "--methods", "lora", "dc", "--set", "n_train=16", "n_eval=8", "max_length=32",
            "epochs_stage1=1", "sweep_ranks=", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    assert not run_dir(tmp_path, "lora", 42).exists() and (run_dir(tmp_path, "dc", 42) / "metrics.json").exists()


def test_a_locked_run_is_refused_and_a_stale_lock_taken_over(tmp_path):
    cfg = tiny_config(sweep_ranks=())
    rd = run_dir(tmp_path, "lora", 7)
    with run_lock(rd):
        held = json.loads((rd / LOCK).read_text())
        with pytest.raises(RunLocked, match=f"process {held['pid']} on {held['host']}.*delete .*{LOCK}"):
            run_experiment(cfg, "lora", 7, tmp_path, progress=False)
    assert not (rd / LOCK).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    (rd / LOCK).write_text(json.dumps({**held, "pid": int(dead)}))
    assert run_experiment(cfg, "lora", 7, tmp_path, progress=False)["complete"]
    assert not (rd / LOCK).exists()
    held_elsewhere = {**held, "host": "another-node"}
    (rd.parent / "seed8").mkdir()
    (rd.parent / "seed8" / LOCK).write_text(json.dumps(held_elsewhere))
    with pytest.raises(RunLocked, match="another-node"):
        run_experiment(cfg, "lora", 8, tmp_path, progress=False)


def test_ranks_add_the_method_trained_at_each_rank():
    cfg = tiny_config(methods=("lora", "matryoshka"), seeds=(1,), matryoshka_ranks=(1, 2, 8))
    runs = grid(cfg, ranks={"lora": (2, 8), "matryoshka": (4,)})
    assert names(runs) == [("lora", 1), ("matryoshka", 1), ("lora_r2", 1), ("matryoshka_r4", 1)]
    by_name = {name: c for name, _, _, c in runs}
    assert by_name["lora"] is cfg  # k = r is the plain run
    small = by_name["lora_r2"]
    assert (small.r, small.rank_schedule, small.sweep_ranks, small.lora_alpha) == (2, (2, 2, 2), (2,), cfg.lora_alpha)
    assert by_name["matryoshka_r4"].matryoshka_ranks == (1, 2)
    with pytest.raises(ValueError, match="unknown method"):
        grid(cfg, ranks={"lorax": (2,)})
