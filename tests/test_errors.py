"""Bad inputs and faults end in one clear error (issue 15), never in a run that looks fine."""
import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import hybrid_lora.runs as runs_mod
import hybrid_lora.train as train_mod
from hybrid_lora.checkpoint import CheckpointWarning, load_checkpoint
from hybrid_lora.config import ExperimentConfig
from hybrid_lora.results import read_json, run_dir, write_json_atomic
from hybrid_lora.grid import preflight
from hybrid_lora.runs import run_experiment
from hybrid_lora.train import NonFiniteLoss

from conftest import tiny_config

WORDS = "the a film meal was good bad slow fresh kind cold plot actor chef".split()


def write_domains(data_dir, n_train: int = 24, n_test: int = 10, empty: str | None = None) -> None:
    """imdb.jsonl and yelp.jsonl of short made-up texts; `empty` names a domain whose train
    texts are all empty."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for d, domain in enumerate(("imdb", "yelp")):
        rows = []
        for i in range(n_train + n_test):
            split = "train" if i < n_train else "test"
            text = " ".join(WORDS[(i * 7 + j * 3 + d) % len(WORDS)] for j in range(6))
            rows.append({"text": "" if domain == empty and split == "train" else text, "split": split})
        (data_dir / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def local_config(data_dir, **changes) -> ExperimentConfig:
    return tiny_config(data_source="local", data_dir=str(data_dir), epochs_stage2=1, rank_schedule=(8,),
                       sweep_ranks=(), sweep_kinds=(), **changes)


def cli(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_lora", *argv], capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("field, value", [("lambda_dc", math.nan), ("lr", math.inf),
                                          ("lora_alpha", math.nan), ("lambda_ewc", -math.inf)])
def test_non_finite_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}=.*finite"):
        dataclasses.replace(ExperimentConfig(), **{field: value})


def test_max_length_1_is_refused_at_validation():
    with pytest.raises(ValueError, match="max_length=1: must be at least 2"):
        dataclasses.replace(ExperimentConfig(), max_length=1)


def test_cli_nan_override_is_one_line_naming_the_field(tmp_path):
    proc = cli("run", "--out", str(tmp_path), "--set", "lambda_dc=nan")
    assert proc.returncode == 2 and "lambda_dc=nan" in proc.stderr and "Traceback" not in proc.stderr


def test_lambda_sweep_of_a_method_without_a_regularizer_is_refused_before_training(tmp_path):
    proc = cli("run", "--out", str(tmp_path / "out"), "--no-progress", "--lambdas", "lora=0.1")
    assert proc.returncode == 2 and "'lora' has no lambda-weighted regularizer" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    with pytest.raises(ValueError, match="lambda must be a finite number"):
        preflight(tiny_config(), tmp_path / "api", {"dc": (math.nan,)})


# ------------------------------------------------------------------------ data
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    write_domains(tmp_path)
    path = tmp_path / "imdb.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut short: not JSON any more
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:3: not a JSON object"):
        run_experiment(local_config(tmp_path), "lora", 1, tmp_path / "out", progress=False)


def test_training_texts_without_tokens_are_an_error(tmp_path):
    write_domains(tmp_path, empty="yelp")
    with pytest.raises(ValueError, match="domain 'yelp': its 16 train texts hold no token to predict"):
        run_experiment(local_config(tmp_path), "lora", 1, tmp_path / "out", progress=False)
    assert not (run_dir(tmp_path / "out", "lora", 1) / "config.json").exists()


# ----------------------------------------------------------------------- model
def test_model_folder_that_does_not_exist_is_named(tmp_path):
    missing = str(tmp_path / "no" / "model")
    proc = cli("run", "--out", str(tmp_path / "out"), "--model", missing)
    assert proc.returncode == 2
    assert f"model_name={missing!r}: no such folder, and not a Hugging Face hub id" in proc.stderr
    assert "Traceback" not in proc.stderr and "--debug" in proc.stderr


def test_model_folder_without_tokenizer_says_so(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "m")
    cfg = dataclasses.replace(tiny_config(), model_name=str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="the folder has no tokenizer"):
        run_experiment(cfg, "lora", 1, tmp_path / "out", progress=False)


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = cli("run", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "gone"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


# --------------------------------------------------------------- output folder
def test_unwritable_out_is_named_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = cli("run", "--out", str(blocker / "out"), "--no-progress")
    assert proc.returncode == 2 and f"cannot write results to {blocker / 'out'}" in proc.stderr


def test_result_files_get_the_users_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_batch_larger_than_training_set_warns(tmp_path):
    with pytest.warns(UserWarning, match="batch_size=32 > n_train=16"):
        preflight(tiny_config(batch_size=32), tmp_path, {})


# ------------------------------------------------------------ non-finite values
class NanAt:
    """Stands in for `causal_lm_sums`: the loss sum of training forward pass `at` is NaN."""

    def __init__(self, at: int):
        self.at, self.calls, self.real = at, 0, train_mod.causal_lm_sums

    def __call__(self, *args, **kwargs):
        self.calls += 1
        ce, n, hits = self.real(*args, **kwargs)
        return (ce * math.nan if self.calls == self.at else ce), n, hits


def test_non_finite_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(checkpoint_every=2)  # 4 steps an epoch: checkpoints after steps 2, 4, ...
    nan = NanAt(3)  # batch 2 (0-based) of Stage 1's only epoch
    monkeypatch.setattr(train_mod, "causal_lm_sums", nan)
    with pytest.raises(NonFiniteLoss, match=r"stage 1, epoch 1, batch 2 \(0-based\).*ce=nan"):
        run_experiment(cfg, "hybrid", 1, tmp_path, progress=False)
    assert nan.calls == 3  # stopped at that step (on CPU every step is checked)
    rd = run_dir(tmp_path, "hybrid", 1)
    assert not (rd / "metrics.json").exists()
    assert read_json(rd / "checkpoints" / "latest.json")["dir"] == "s1-e1-b2"
    model, _, _ = load_checkpoint(rd, cfg, torch.device("cpu"))  # finite, else load_adapter refuses
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)


def test_guard_without_a_sync_per_step_names_the_first_bad_batch():
    guard = train_mod.FiniteGuard(torch.device("cpu"), 2, 3)
    for batch, value in enumerate([1.0, 2.0, math.inf, math.nan, 5.0]):
        loss = torch.tensor(value)
        guard.record(batch, loss, {"ce": loss, "dc": torch.tensor(0.5 * batch)})
    with pytest.raises(NonFiniteLoss, match=r"stage 2, epoch 3, batch 2 \(0-based\).*ce=inf, dc=1\b"):
        guard.check()


def test_non_finite_evaluation_never_marks_a_run_complete(tmp_path, monkeypatch):
    real, calls = runs_mod.evaluate_loss_and_token_acc, [0]

    def nan_after_stage1(model, loader, *args, **kwargs):
        out = real(model, loader, *args, **kwargs)
        calls[0] += 1
        return {**out, "loss": math.nan} if calls[0] > 2 else out  # R row 0 fine, row 1 NaN

    monkeypatch.setattr(runs_mod, "evaluate_loss_and_token_acc", nan_after_stage1)
    with pytest.raises(NonFiniteLoss, match="after stage 1 gave loss nan"):
        run_experiment(tiny_config(), "lora", 1, tmp_path, progress=False)
    assert not (run_dir(tmp_path, "lora", 1) / "metrics.json").exists()


# ------------------------------------------------------------------ checkpoints
def interrupted(tmp_path, monkeypatch, cfg: ExperimentConfig | None = None, stop_at: int = 4):
    """The checkpoints folder of a `lora` run (`cfg`: tiny, a checkpoint every step) stopped on
    training step `stop_at` of 4 in Stage 1: the latest checkpoint is s1-e1-b3, s1-e1-b2 the
    one before it (kept as a fallback)."""

    class Interrupt(Exception):
        pass

    real, calls = train_mod.causal_lm_sums, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at:
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "causal_lm_sums", counted)
    with pytest.raises(Interrupt):
        run_experiment(cfg or tiny_config(checkpoint_every=1), "lora", 1, tmp_path, progress=False)
    monkeypatch.setattr(train_mod, "causal_lm_sums", real)
    return run_dir(tmp_path, "lora", 1) / "checkpoints"


@pytest.fixture(scope="module")
def reference_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_experiment(tiny_config(checkpoint_every=1), "lora", 1, out, progress=False)
    return (run_dir(out, "lora", 1) / "metrics.json").read_text()


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, what", [
    (lambda root: (root / "latest.json").write_text('{"dir": "s1-e1'), "latest.json is unreadable"),
    (lambda root: (root / "latest.json").write_text(""), "latest.json is unreadable"),
    (lambda root: flip_a_byte(root / "s1-e1-b3" / "adapter" / "adapter_model.safetensors"),
     "adapter/adapter_model.safetensors does not match its checksum"),
    (lambda root: shutil.rmtree(root / "s1-e1-b3"), "s1-e1-b3: the folder is gone"),
    (lambda root: (root / "s1-e1-b3" / "state.pt").write_bytes(
        (root / "s1-e1-b3" / "state.pt").read_bytes()[:100]), "state.pt does not match its checksum"),
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, reference_lora,
                                                                  damage, what):
    root = interrupted(tmp_path, monkeypatch)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["s1-e1-b2", "s1-e1-b3"]
    damage(root)
    with pytest.warns(CheckpointWarning, match=what):
        run_experiment(tiny_config(checkpoint_every=1), "lora", 1, tmp_path, progress=False)
    assert (run_dir(tmp_path, "lora", 1) / "metrics.json").read_text() == reference_lora


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    root = interrupted(tmp_path, monkeypatch)
    for folder in ("s1-e1-b2", "s1-e1-b3"):
        shutil.rmtree(root / folder)
    with pytest.raises(ValueError, match=r"no usable checkpoint .*s1-e1-b3: the folder is gone.*"
                                         r"Delete .* to start the run over"):
        run_experiment(tiny_config(checkpoint_every=1), "lora", 1, tmp_path, progress=False)


def test_adapter_with_non_finite_weights_is_refused(tmp_path):
    from hybrid_lora.adapters import build_model, load_adapter, lora_factors

    cfg = tiny_config()
    model, _ = build_model(cfg)
    with torch.no_grad():
        lora_factors(model)[0][2][0, 0] = math.nan
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"adapter .*bad: .*lora_B.* holds non-finite values"):
        load_adapter(cfg, tmp_path / "bad")


# --------------------------------------------------------- same run, same data
def test_same_data_folder_spelled_otherwise_is_the_same_setting(tmp_path, monkeypatch):
    write_domains(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    run_experiment(local_config("data"), "lora", 1, "out", progress=False)
    for spelling in ("./data/", str(tmp_path / "data"), str(tmp_path / "data") + "/"):
        again = run_experiment(local_config(spelling), "lora", 1, "out", progress=False)
        assert again["complete"]


def test_changed_data_at_the_same_path_is_refused(tmp_path, monkeypatch):
    write_domains(tmp_path / "data")
    cfg = local_config(tmp_path / "data")
    run_experiment(cfg, "lora", 1, tmp_path / "out", progress=False)
    prints = read_json(run_dir(tmp_path / "out", "lora", 1) / "config.json")["fingerprints"]
    assert set(prints) == {"data", "model"} and set(prints["data"]) == {"imdb", "yelp"}
    path = tmp_path / "data" / "yelp.jsonl"
    path.write_text(path.read_text().replace("chef", "cook"))
    with pytest.raises(ValueError, match="the data of domain 'yelp' changed since"):
        run_experiment(cfg, "lora", 1, tmp_path / "out", progress=False)  # complete: not skipped


def save_tiny_base(folder, seed: int) -> None:
    """A 2-layer GPT-2 with random weights from `seed` and the byte tokenizer, saved as a model folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hybrid_lora.adapters import byte_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_layer=2, n_embd=64,
                                           n_head=2, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def test_changed_base_model_in_the_same_folder_is_not_resumed(tmp_path, monkeypatch):
    save_tiny_base(tmp_path / "base", seed=1)
    cfg = tiny_config(checkpoint_every=1, model_name=str(tmp_path / "base"))
    interrupted(tmp_path / "out", monkeypatch, cfg)
    save_tiny_base(tmp_path / "base", seed=2)  # other weights, same path
    with pytest.raises(ValueError, match=r"the base model '.*base' changed since"):
        run_experiment(cfg, "lora", 1, tmp_path / "out", progress=False)


def test_a_run_that_failed_while_loading_does_not_block_the_corrected_command(tmp_path):
    write_domains(tmp_path / "data")
    wrong = local_config(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no file"):
        run_experiment(wrong, "lora", 1, tmp_path / "out", progress=False)
    assert not (run_dir(tmp_path / "out", "lora", 1) / "config.json").exists()
    assert run_experiment(local_config(tmp_path / "data"), "lora", 1, tmp_path / "out",
                          progress=False)["complete"]


# ----------------------------------------------------------------- command line
def test_cli_answers_without_importing_torch():
    code = "import sys, hybrid_lora.cli, hybrid_lora; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr
    help_ = cli("run", "--help", timeout=60)
    assert help_.returncode == 0 and "--debug" in help_.stdout


def test_every_subcommand_prints_its_help():
    """Regression: `table --help` raised ValueError (a bare '%' in the help of --paper, which
    argparse reads as a format); every subcommand's help must format."""
    from hybrid_lora.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"run", "table", "plot", "sweep-ranks", "export"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        assert text.startswith("usage: python -m hybrid_lora " + name), name
    assert "mean [95% t-interval] over seeds" in " ".join(subparsers.choices["table"].format_help().split())


def test_public_names_still_import_from_the_package():
    import hybrid_lora as hl

    for name in hl.__all__:
        assert getattr(hl, name) is not None
    import hybrid_lora.grid as grid_mod
    assert hl.run_all is grid_mod.run_all and hl.ExperimentConfig is ExperimentConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hl.nope
