"""Config files (issue 29, part 5): `run --config FILE`, YAML or JSON, --set on top; a run's own
config.json reruns that run to the same numbers; bad files get one-line errors."""
import json

import pytest

from hybrid_lora.cli import build_parser, config_from_args, main
from hybrid_lora.config import ExperimentConfig
from hybrid_lora.results import run_dir

TINY = ("--set", "n_train=16", "n_eval=8", "max_length=32", "batch_size=4", "epochs_stage1=1", "sweep_ranks=1,2")


def parse(*argv) -> ExperimentConfig:
    return config_from_args(build_parser().parse_args(["run", "--out", "x", *map(str, argv)]))


def test_a_yaml_file_sets_fields_on_the_preset_and_set_goes_on_top(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("r: 4\nrank_schedule: [4, 2]\nepochs_stage2: 2\nlr: 1e-3\nlambda_dc: 0.5\n"
                    "sweep_n_eval: null\nmethods: [lora, dc]\ngradient_checkpointing: true\n")
    cfg = parse("--preset", "smoke", "--config", path, "--seeds", "7", "--set", "lambda_dc=2")
    smoke = ExperimentConfig.smoke()
    assert (cfg.r, cfg.rank_schedule, cfg.epochs_stage2, cfg.lr) == (4, (4, 2), 2, 1e-3)
    assert cfg.methods == ("lora", "dc") and cfg.seeds == (7,) and cfg.gradient_checkpointing is True
    assert cfg.lambda_dc == 2.0  # --set over the file
    assert cfg.sweep_n_eval is None and cfg.n_train == smoke.n_train  # the rest: the preset's
    json_path = tmp_path / "study.json"
    json_path.write_text(json.dumps({"r": 4, "rank_schedule": [4, 2], "epochs_stage2": 2, "lr": 1e-3,
                                     "lambda_dc": 2.0, "methods": ["lora", "dc"], "seeds": [7],
                                     "gradient_checkpointing": True, "sweep_n_eval": None}))
    assert parse("--preset", "smoke", "--config", json_path) == cfg


def test_a_runs_config_json_reruns_that_run_to_the_same_numbers(tmp_path, capsys):
    assert main(["run", "--methods", "lora", "dc", "--seeds", "3", "--no-progress", *TINY,
                 "--out", str(tmp_path / "a")]) == 0
    saved = run_dir(tmp_path / "a", "dc", 3) / "config.json"
    cfg = parse("--config", saved)
    assert cfg.methods == ("dc",) and cfg.seeds == (3,)  # that run, not the whole call
    assert main(["run", "--config", str(saved), "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert [p.parent.name for p in (tmp_path / "b").glob("*/seed*")] == ["dc"]
    for name in ("metrics.json", "sweep.json"):
        assert (run_dir(tmp_path / "b", "dc", 3) / name).read_text() == (run_dir(tmp_path / "a", "dc", 3) / name).read_text()


@pytest.mark.parametrize("text, suffix, message", [
    ("r: 4\nbatch_sise: 8\n", ".yaml", "--config {}: unknown ExperimentConfig field 'batch_sise' (did you mean 'batch_size'?)"),
    ("r: [1]\n", ".yaml", "--config {}: r: cannot read '[1]' as <class 'int'>"),
    ("r: 0\n", ".yaml", "ExperimentConfig.r=0: must be a positive integer"),
    ("r: 4\n  x: [\n", ".yaml", "--config {}: not valid YAML"),
    ('{"r": 4,}', ".json", "--config {}: not valid JSON"),
    ("[1, 2]", ".json", "--config {}: expected a mapping of ExperimentConfig fields, found list"),
])
def test_bad_config_files_are_one_line_errors_naming_the_file(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message.format(path) in err, err
    assert not (tmp_path / "out").exists()
    code = main(["run", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "out")])
    assert code == 2 and f"--config {tmp_path / 'none.yaml'}: no such file" in capsys.readouterr().err


def test_a_notebook_loads_a_config_file_onto_any_config(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("lambda_dc: 0.25\ndomains: [imdb, code]\n")
    cfg = ExperimentConfig.smoke().with_file(path)
    assert cfg.lambda_dc == 0.25 and cfg.domains == ("imdb", "code") and cfg.r == ExperimentConfig.smoke().r
