import subprocess
import sys

import pytest

from hybrid_lora.cli import build_parser, config_from_args, main
from hybrid_lora.results import read_json

from conftest import SHARED_DATA


def test_smoke_preset_runs_all_methods_from_the_command_line(tmp_path, capsys):
    assert main(["run", "--preset", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for m in ("lora", "dylora", "dc", "hybrid"):
        assert (tmp_path / m / "seed42" / "metrics.json").is_file()
        assert printed.count(f"\n{m} ") == 1
    assert len((tmp_path / "summary.csv").read_text().strip().splitlines()) == 5


def test_overrides_reach_the_written_config(tmp_path):
    argv = ["run", "--preset", "smoke", "--methods", "hybrid", "--seeds", "3", "--out", str(tmp_path),
            "--no-progress", "--set", "n_train=16", "n_eval=8", "lambda_dc=0.5", "rank_schedule=8,2,1"]
    assert main(argv) == 0
    config = read_json(tmp_path / "hybrid" / "seed3" / "config.json")
    assert (config["n_train"], config["lambda_dc"], config["rank_schedule"]) == (16, 0.5, [8, 2, 1])
    assert [r["rank"] for r in read_json(tmp_path / "hybrid" / "seed3" / "history.json")][-3:] == [8, 2, 1]


def test_data_dir_and_model_flags_select_sources():
    args = build_parser().parse_args(["run", "--data-dir", "/x", "--model", "/m", "--out", "o"])
    cfg = config_from_args(args)
    assert (cfg.data_source, cfg.data_dir, cfg.model_name) == ("local", "/x", "/m")


def test_bad_override_is_a_usage_error_naming_the_value(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hybrid_lora", "run", "--out", str(tmp_path),
                           "--set", "rank_schedule=8,16,2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "rank_schedule" in proc.stderr and "16" in proc.stderr


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
def test_smoke_preset_on_the_shared_reviews(tmp_path):
    argv = ["run", "--preset", "smoke", "--methods", "lora", "hybrid", "--data-dir", str(SHARED_DATA),
            "--out", str(tmp_path), "--no-progress", "--set", "n_train=32", "n_eval=16"]
    assert main(argv) == 0
    m = read_json(tmp_path / "hybrid" / "seed42" / "metrics.json")
    assert m["A_after_stage1"]["loss"] < m["A_base"]["loss"]  # Stage 1 learned something on IMDb
