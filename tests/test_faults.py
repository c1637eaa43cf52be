"""Faults, round two (issue 25): each case a hostile user found ends in one clear error before
any training, or works; one regression test per case."""
import errno
import json
import math
import shutil

import pytest
import torch

import hybrid_lora.train as train_mod
from hybrid_lora.cli import main
from hybrid_lora.results import SCHEMA_VERSION, read_json, run_dir, write_json_atomic
from hybrid_lora.runs import run_experiment

from conftest import tiny_config
from test_errors import interrupted, save_tiny_base, write_domains


def run_cli(capsys, *argv) -> tuple[int, str]:
    """`python -m hybrid_lora ARGV` in this process: (exit code, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    return code, capsys.readouterr().err


# ------------------------------------------------------- a rank outside sweep_ranks
@pytest.mark.parametrize("method, changes", [("lora", {"r": 12, "rank_schedule": (12,), "epochs_stage2": 1}),
                                             ("dylora", {"rank_schedule": (8, 3), "epochs_stage2": 2})])
def test_a_rank_outside_sweep_ranks_completes_with_its_own_rank_as_reference(tmp_path, method, changes):
    cfg = tiny_config(sweep_ranks=(1, 2, 4), sweep_kinds=("slice",), **changes)
    out = run_experiment(cfg, method, 1, tmp_path, progress=False)
    rows = read_json(run_dir(tmp_path, method, 1) / "sweep.json")
    own = {(r["adapter"], r["domain"]): r for r in rows if r["rank"] == r["adapter_rank"]}
    assert set(own) == {(a, d) for a in ("stage1", "final") for d in ("A", "B")}
    assert {r["rank"] for r in rows} == {1, 2, 4} | {r["adapter_rank"] for r in rows}
    # the own-rank row is the uncut adapter: the R matrix's entry, not a cut
    assert own["final", "B"]["loss"] == pytest.approx(out["metrics"]["B_after_stage2"]["loss"], rel=1e-6)
    # ... and equals a fresh evaluation of the saved final adapter (an independent reference)
    from hybrid_lora.adapters import load_adapter, load_tokenizer
    from hybrid_lora.data import make_loaders
    from hybrid_lora.evaluate import evaluate_loss_and_token_acc

    model = load_adapter(cfg, run_dir(tmp_path, method, 1) / "adapter_final")
    fresh = evaluate_loss_and_token_acc(model, make_loaders(cfg, load_tokenizer(cfg), cfg.domains[1], 1).eval)
    assert own["final", "B"]["loss"] == pytest.approx(fresh["loss"], rel=1e-5)
    assert all(math.isfinite(v) for k, v in out["metrics"].items() if k.startswith("rank_auc_loss"))


def test_sweep_ranks_may_change_until_the_run_completes(tmp_path, monkeypatch):
    cfg = tiny_config(checkpoint_every=1, sweep_ranks=(1, 2))
    interrupted(tmp_path, monkeypatch, cfg)
    done = run_experiment(tiny_config(checkpoint_every=1, sweep_ranks=(1, 4)), "lora", 1, tmp_path, progress=False)
    assert {r["rank"] for r in read_json(run_dir(tmp_path, "lora", 1) / "sweep.json")} == {1, 4, 8}
    assert done["config"]["sweep_ranks"] == [1, 4]
    with pytest.raises(ValueError, match=r"sweep_ranks: saved \[1, 4\], now \[1, 2\].*use `python -m "
                                         r"hybrid_lora sweep-ranks --run .*seed1`"):
        run_experiment(cfg, "lora", 1, tmp_path, progress=False)


# --------------------------------------------------- a changed base model on resume
def test_a_changed_architecture_on_resume_is_named_not_blamed_on_the_checkpoints(tmp_path, monkeypatch):
    save_tiny_base(tmp_path / "base", seed=1)
    cfg = tiny_config(checkpoint_every=1, model_name=str(tmp_path / "base"))
    interrupted(tmp_path / "out", monkeypatch, cfg)
    shutil.copytree(tmp_path / "base", tmp_path / "right")
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_layer=2, n_embd=32, n_head=2))
    other.save_pretrained(tmp_path / "other")
    for name in ("config.json", "model.safetensors"):  # another architecture at the same path
        shutil.copy(tmp_path / "other" / name, tmp_path / "base" / name)
    with pytest.raises(ValueError, match=r"the base model '.*base' changed since") as err:
        run_experiment(cfg, "lora", 1, tmp_path / "out", progress=False)
    assert "checkpoint" not in str(err.value)
    shutil.rmtree(tmp_path / "base")
    shutil.move(tmp_path / "right", tmp_path / "base")  # the right model back: it resumes
    assert run_experiment(cfg, "lora", 1, tmp_path / "out", progress=False)["complete"]


# ------------------------------------------------------------------ table options
def test_matched_gain_out_of_range_or_unreached_never_overwrites_the_table(tmp_path, capsys):
    from test_pairing_and_tables import _curve, _run

    for seed in (1, 2):
        _run(tmp_path, "lora", "lora", seed, *_curve(0.6, 2.0, 2.0))
        for lam, forget, gain in ((0.01, 0.3, 1.9), (0.1, 0.1, 1.5)):
            _run(tmp_path, f"l2_lam{lam:g}", "l2", seed, *_curve(forget, gain, gain), lam=lam)
    assert run_cli(capsys, "table", "--results", tmp_path, "--matched-gain", "0.9", "--n-boot", "10")[0] == 0
    good = (tmp_path / "matched_gain.csv").read_text()
    for bad in ("90", "5", "-1", "nan", "0"):
        code, err = run_cli(capsys, "table", "--results", tmp_path, "--matched-gain", bad)
        assert code == 2 and f"argument --matched-gain: '{bad}' is not a fraction in (0, 1]" in err
    # 1.0 x lora's validation gain (2.0) is above every l2 point (1.9): no seed reaches it
    code, err = run_cli(capsys, "table", "--results", tmp_path, "--matched-gain", "1.0", "--n-boot", "10")
    assert code == 2 and "matched_gain.csv not written" in err and "no seed's validation gain reaches 1.0" in err
    assert (tmp_path / "matched_gain.csv").read_text() == good
    for option in ("--n-boot", "0"), ("--n-boot", "-5"):
        assert "is not a positive integer" in run_cli(capsys, "table", "--results", tmp_path, *option)[1]


def test_write_table_refuses_an_empty_or_all_nan_table_and_keeps_the_old_file(tmp_path):
    import pandas as pd

    from hybrid_lora.cli_tables import write_table

    write_table(tmp_path, "t.csv", pd.DataFrame({"run": ["lora"], "auc": [0.5]}))
    good = (tmp_path / "t.csv").read_text()
    for table in (pd.DataFrame(columns=["run", "auc"]), pd.DataFrame({"run": ["lora"], "auc": [math.nan]}),
                  pd.DataFrame({"run": ["l2"], "n_seeds": [0], "fraction": [0.9], "d_forget": [math.nan]})):
        with pytest.raises(ValueError, match="t.csv not written: the table has no numbers.*left as it was"):
            write_table(tmp_path, "t.csv", table)
    assert (tmp_path / "t.csv").read_text() == good


def test_results_of_a_newer_schema_are_refused_by_table_and_plot(tmp_path, capsys):
    from conftest import write_fake_run

    m = {k: {"loss": 5.0 - i * 0.1, "acc": 0.1 + i * 0.01} for i, k in
         enumerate(("A_base", "B_base", "A_after_stage1", "A_after_stage2", "B_after_stage2"))}
    write_fake_run(run_dir(tmp_path, "lora", 1), "lora", 1, m, [{"seconds": 1.0}])
    path = run_dir(tmp_path, "lora", 1) / "metrics.json"
    write_json_atomic(path, {**read_json(path), "schema_version": SCHEMA_VERSION + 1})
    for argv in (("table", "--results", tmp_path), ("plot", "--results", tmp_path, "--images", tmp_path / "im")):
        code, err = run_cli(capsys, *argv)
        assert code == 2 and f"has schema_version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}" in err
    assert not (tmp_path / "cl_table.csv").exists() and not (tmp_path / "im").exists()


# ---------------------------------------------------------- interruptions, full disk
TINY_CLI = ("run", "--methods", "lora", "--seeds", "1", "--no-progress", "--set", "n_train=16", "n_eval=8",
            "max_length=32", "batch_size=4", "epochs_stage1=1", "checkpoint_every=1", "sweep_ranks=1,2")


def test_ctrl_c_says_where_the_run_stands_exits_130_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    real, calls = train_mod.causal_lm_sums, [0]

    def ctrl_c_on_step_4(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "causal_lm_sums", ctrl_c_on_step_4)
    code, err = run_cli(capsys, *TINY_CLI, "--out", tmp_path)
    rd = run_dir(tmp_path, "lora", 1)
    assert code == 130 and err.count("\n") == 1, err
    assert (f"interrupted: the run in {rd} was interrupted. Run the same command again: finished runs are "
            f"skipped and it resumes from its latest checkpoint, stage 1 epoch 1 step 3, in {rd / 'checkpoints'}"
            in err)
    assert not (rd / ".lock").exists()
    monkeypatch.setattr(train_mod, "causal_lm_sums", real)
    assert run_cli(capsys, *TINY_CLI, "--out", tmp_path)[0] == 0 and (rd / "metrics.json").exists()


def test_a_full_disk_names_the_file_removes_the_partial_checkpoint_and_the_run_resumes(tmp_path, capsys,
                                                                                     monkeypatch):
    import collections

    import hybrid_lora.checkpoint as ckpt_mod
    import hybrid_lora.results as results_mod

    real_save, real_usage = ckpt_mod.torch.save, results_mod.shutil.disk_usage

    def full(obj, path, *args, **kwargs):  # what torch says when the disk fills during torch.save
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 27328 vs 27220")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    monkeypatch.setattr(results_mod.shutil, "disk_usage",
                        lambda p: collections.namedtuple("usage", "total used free")(10 ** 9, 10 ** 9, 4096))
    code, err = run_cli(capsys, *TINY_CLI, "--out", tmp_path)
    root = run_dir(tmp_path, "lora", 1) / "checkpoints"
    assert code == 2 and f"error: cannot write {root / 's1-e1-b1'}: its disk is full (4096 bytes free; " \
                         "RuntimeError: [enforce fail" in err and "run the same command again" in err
    assert not list(root.glob(".*.tmp"))  # the partial checkpoint gave its space back
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    monkeypatch.setattr(results_mod.shutil, "disk_usage", real_usage)
    assert run_cli(capsys, *TINY_CLI, "--out", tmp_path)[0] == 0


def test_disk_errors_pass_other_failures_unchanged(tmp_path, monkeypatch):
    import collections

    import hybrid_lora.results as results_mod
    from hybrid_lora.results import DiskFull, disk_errors

    with pytest.raises(RuntimeError, match="^a bug$"):  # plenty of space: not a full disk
        with disk_errors(tmp_path / "f"):
            raise RuntimeError("a bug")
    monkeypatch.setattr(results_mod.shutil, "disk_usage",
                        lambda p: collections.namedtuple("usage", "total used free")(10 ** 9, 10 ** 9, 0))
    with pytest.raises(TypeError, match="^not serializable$"):  # a bug on a full disk is still a bug
        with disk_errors(tmp_path / "f"):
            raise TypeError("not serializable")
    monkeypatch.undo()
    with pytest.raises(DiskFull, match=r"cannot write .*f: its disk is full .*No space left on device"):
        with disk_errors(tmp_path / "f"):
            raise OSError(errno.ENOSPC, "No space left on device")


# ------------------------------------------------ model, tokenizer, device up front
def save_gpt2(folder, **config) -> None:
    """A random 2-layer GPT-2 folder with the byte tokenizer (257 tokens); `config` overrides."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hybrid_lora.models import byte_tokenizer

    GPT2LMHeadModel(GPT2Config(**{"vocab_size": 257, "n_positions": 64, "n_layer": 2, "n_embd": 32,
                                  "n_head": 2, **config})).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


@pytest.mark.parametrize("config, edit, message", [
    ({"vocab_size": 200}, None, "its tokenizer has 257 tokens but the model's embedding has 200 rows, so "
                                "token ids 200..256 have no embedding"),
    ({"n_positions": 16}, None, "max_length=32 is above the 16 positions of model_name="),
    ({}, {"n_layer": "two"}, "config.json does not describe a model transformers can build (Validation error "
                             "for field 'n_layer'"),
])
def test_a_model_that_does_not_fit_is_refused_before_any_data_or_training(tmp_path, capsys, config, edit, message):
    save_gpt2(tmp_path / "m", **config)
    if edit:
        path = tmp_path / "m" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    code, err = run_cli(capsys, *TINY_CLI, "--model", tmp_path / "m", "--data-dir", tmp_path / "no-data",
                        "--out", tmp_path / "out")
    assert code == 2 and message in err, err  # the data folder does not exist: it was never read
    assert not (tmp_path / "out" / "lora").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_up_front(tmp_path, capsys):
    code, err = run_cli(capsys, *TINY_CLI, "device=cuda", "--data-dir", tmp_path / "no-data", "--out", tmp_path)
    assert code == 2 and ("device='cuda': this torch was built without CUDA" in err or "finds no CUDA GPU" in err)
    assert not (tmp_path / "lora").exists()


# --------------------------------------------------------------- smaller ones
def test_a_suffix_with_a_path_separator_is_refused_before_anything_is_written(tmp_path, capsys):
    code, err = run_cli(capsys, *TINY_CLI, "--suffix", "../../escaped", "--out", tmp_path / "a" / "b")
    assert code == 2 and "--suffix '../../escaped': a suffix ends run folder names and may not hold a path" in err
    assert not (tmp_path / "a").exists()


def test_invalid_utf8_in_a_jsonl_names_the_file_and_the_line(tmp_path, capsys):
    write_domains(tmp_path / "data")
    path = tmp_path / "data" / "yelp.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + [b'{"text": "caf\xe9", "split": "train"}\n'] + lines[2:]))
    code, err = run_cli(capsys, *TINY_CLI, "--data-dir", tmp_path / "data", "--out", tmp_path / "out")
    assert code == 2 and f"{path}:3: not UTF-8 text (byte 0xe9 at byte 14 of the line)" in err, err


def test_a_utf8_byte_order_mark_is_read(tmp_path):
    write_domains(tmp_path / "data")
    path = tmp_path / "data" / "imdb.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    from hybrid_lora.texts import _local_texts

    cfg = tiny_config(data_source="local", data_dir=str(tmp_path / "data"))
    assert _local_texts(cfg, "imdb", 1).train  # the first line parsed


@pytest.mark.parametrize("argv, message", [
    (("run", "--seeds", "-1"), "argument --seeds: '-1' is not a seed (an integer from 0 to 2**63 - 1)"),
    (("run", "--lambdas", "dc=1:0.1"), "--lambdas 'dc=1:0.1': the range LO:HI = 1:0.1 needs 0 < LO <= HI, "
                                       "e.g. dc=0.1:1"),
    (("sweep-ranks", "--run", "."), "--run .: no config.json there, so not a run folder"),
    (("per-input", "--run", "."), "--run .: no config.json there, so not a run folder"),
    (("sweep-ranks", "--run", ".", "--ranks", "0"), "argument --ranks: '0' is not a positive integer"),
    (("per-input", "--run", ".", "--averages", "-2"), "argument --averages: '-2' is not a positive integer"),
])
def test_bad_options_are_one_line_naming_the_option(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *argv, *(("--out", "out") if argv[0] == "run" else ()))
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_seeds_outside_the_generators_range_are_refused_by_the_config():
    with pytest.raises(ValueError, match=r"ExperimentConfig.seeds=\(3, -1\): seed -1 is not an integer"):
        tiny_config(seeds=(3, -1)).validate()
    with pytest.raises(ValueError, match="ExperimentConfig.base_seed=.*2\\*\\*63"):
        tiny_config(base_seed=2 ** 63).validate()


def test_plot_only_matching_nothing_and_out_that_is_a_file_are_errors(tmp_path, capsys):
    from conftest import write_fake_run

    m = {k: {"loss": 5.0 - i * 0.1, "acc": 0.1 + i * 0.01} for i, k in
         enumerate(("A_base", "B_base", "A_after_stage1", "A_after_stage2", "B_after_stage2"))}
    write_fake_run(run_dir(tmp_path, "lora", 1), "lora", 1, m, [{"seconds": 1.0}])
    code, err = run_cli(capsys, "plot", "--results", tmp_path, "--images", tmp_path / "im", "--only", "zzz")
    assert code == 2 and "--only zzz: no figure of" in err
    (tmp_path / "file").write_text("")
    code, err = run_cli(capsys, "plot", "--results", tmp_path, "--images", tmp_path / "file")
    assert code == 2 and "cannot write figures into" in err and "it is a file, not a folder" in err
    code, err = run_cli(capsys, *TINY_CLI, "--out", tmp_path / "file")
    assert code == 2 and "is a file, not a folder" in err


def test_a_slurm_array_variable_that_is_not_a_number_or_alone_is_refused():
    from hybrid_lora.grid import shard_from_env

    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID='abc' is not a task number"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT is not: give the shard with --shard"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "1"})  # else every task would run the whole grid
