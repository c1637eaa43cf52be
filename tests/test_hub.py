"""Hub ids that load with today's huggingface_hub, and the hub data path run on local folders
laid out as the hub serves the datasets (parquet under plain_text/, the real column names)."""
import dataclasses
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from hybrid_lora.config import HUB_DOMAINS, PRESETS, ExperimentConfig, from_preset
from hybrid_lora.data import hub_source, load_texts
from hybrid_lora.results import read_json, run_dir
from hybrid_lora import sources
from hybrid_lora.sources import HUB_ALIASES, hub_id

REPO = Path(__file__).resolve().parents[1]
# where a hub id is written in docs, notebooks and code: the id is group 1
ID_PATTERNS = [r"--model[ =]([^\s`'\"]+)", r"model_name=[\"']([^\"']+)", r"MODEL = [\"']([^\"']+)",
               r"from_pretrained\([\"']([^\"']+)", r"load_dataset\([\"']([^\"']+)",
               r"domains=([^\s`'\"]+)"]


def written_ids(text: str) -> list[str]:
    """Every model or dataset id `text` writes where a user would copy it from."""
    found = []
    for pattern in ID_PATTERNS:
        for match in re.findall(pattern, text):
            for part in match.split(","):  # domains=imdb,fancyzhx/ag_news:text: only a spec with
                if "domains" not in pattern:  # a column names a hub dataset
                    found.append(part)
                elif ":" in part:
                    found.append(part.split(":")[0].split("@")[0])
    return found


def test_every_default_hub_id_has_a_namespace():
    defaults = [name for name, *_ in HUB_DOMAINS.values()]
    defaults += [from_preset(p).model_name for p in PRESETS if from_preset(p).data_source == "hub"]
    assert all("/" in name for name in defaults), defaults
    files = [*REPO.glob("docs/*.md"), REPO / "README.md", *REPO.glob("notebooks/*.ipynb"),
             *REPO.glob("benchmarks/*.py"), *REPO.glob("hybrid_lora/*.py")]
    files.remove(REPO / "hybrid_lora" / "sources.py")  # the table of old ids
    old = {(f.name, name) for f in files for name in written_ids(f.read_text()) if name in HUB_ALIASES}
    assert not old, f"old unnamespaced hub ids written: {sorted(old)}"
    assert written_ids("run --model gpt2 --set domains=imdb,ag_news:text") == ["gpt2", "ag_news"]


def test_old_ids_are_translated_once_and_a_local_folder_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "_announced", set())
    monkeypatch.chdir(tmp_path)
    assert hub_id("gpt2") == "openai-community/gpt2"
    assert capsys.readouterr().out.count("'gpt2' is now 'openai-community/gpt2'") == 1
    assert hub_id("gpt2") == "openai-community/gpt2"
    assert capsys.readouterr().out == ""  # said once per name
    assert hub_id("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"  # any other id passes through
    assert hub_id("my-model") == "my-model"
    (tmp_path / "ag_news").mkdir()  # a local folder of that name: loaded as it is
    assert hub_id("ag_news") == "ag_news" and hub_source("ag_news:text")[0] == "ag_news"
    assert hub_source("yelp_polarity:text")[0] == "fancyzhx/yelp_polarity"
    assert hub_source("wikitext@wikitext-103-raw-v1:text")[:2] == ("Salesforce/wikitext", "wikitext-103-raw-v1")


def test_a_run_saved_with_an_old_model_id_resumes_under_the_canonical_one():
    from hybrid_lora.runs import _same_setting

    assert _same_setting("model_name", "gpt2", "openai-community/gpt2")
    assert not _same_setting("model_name", "gpt2", "openai-community/gpt2-medium")


IMDB_README = """---
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
  - split: unsupervised
    path: plain_text/unsupervised-*
  default: true
---
"""


def hub_layout(root: Path, n_train: int = 40, n_test: int = 24) -> None:
    """stanfordnlp/imdb and fancyzhx/yelp_polarity as the hub serves them (README configs,
    parquet shards under plain_text/, columns text and label), and a code dataset with only a
    train split and the text in `content` (as codeparrot/codeparrot-clean-valid)."""
    for repo, word in (("stanfordnlp/imdb", "film"), ("fancyzhx/yelp_polarity", "pasta")):
        folder = root / repo / "plain_text"
        folder.mkdir(parents=True)
        splits = {"train": n_train, "test": n_test} | ({"unsupervised": 6} if "imdb" in repo else {})
        for split, n in splits.items():
            pd.DataFrame({"text": [f"The {word} was {split} number {i}." for i in range(n)],
                          "label": [i % 2 for i in range(n)]}).to_parquet(folder / f"{split}-00000-of-00001.parquet")
        (root / repo / "README.md").write_text(IMDB_README.replace("  - split: unsupervised\n    path: "
                                                                  "plain_text/unsupervised-*\n", "")
                                               if "yelp" in repo else IMDB_README)
    code = root / "codeparrot" / "codeparrot-clean-valid"
    code.mkdir(parents=True)
    with (code / "file-000000000001.json").open("w") as f:
        for i in range(n_train + n_test):
            f.write(json.dumps({"repo_name": f"r{i}", "content": f"def f{i}(x):\n    return x + {i}\n"}) + "\n")


def test_hub_path_end_to_end_on_local_folders_laid_out_as_the_hub(tmp_path, monkeypatch):
    from hybrid_lora.cli import main

    import datasets

    hub_layout(tmp_path)
    monkeypatch.chdir(tmp_path)  # load_dataset("stanfordnlp/imdb") reads the local folder
    # a cache of its own: datasets would reuse an earlier test's stanfordnlp/imdb of other rows
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = dataclasses.replace(ExperimentConfig.smoke(), data_source="hub", domains=("imdb", "code"),
                              n_train=12, n_eval=8, n_val=4)
    imdb, code = load_texts(cfg, "imdb", seed=1), load_texts(cfg, "code", seed=1)
    assert all("test number" in t for t in imdb.eval) and len(imdb.eval) == 8  # the test split
    assert all("train number" in t for t in imdb.train + imdb.val)
    assert not set(imdb.train) & set(imdb.val)
    # no test split: evaluation texts are held out of train, apart from validation and training
    assert len(set(code.train) | set(code.val) | set(code.eval)) == 12 + 4 + 8
    assert load_texts(cfg, "imdb", seed=2).train != imdb.train and load_texts(cfg, "imdb", seed=2).eval == imdb.eval
    with pytest.raises(ValueError, match=r"no column 'review'; columns: \['text', 'label'\]"):
        load_texts(cfg, "stanfordnlp/imdb:review")
    with pytest.raises(ValueError, match="asked for 1004, has 40"):
        load_texts(dataclasses.replace(cfg, n_train=1000), "yelp")
    args = ["run", "--methods", "lora", "--set", "data_source=hub", "domains=imdb,yelp", "n_train=12",
            "n_eval=8", "max_length=32", "epochs_stage1=1", "sweep_ranks=", "--out", "runs", "--no-progress"]
    assert main(args) == 0
    saved = read_json(run_dir(tmp_path / "runs", "lora", 42) / "config.json")
    assert saved["domains"] == ["imdb", "yelp"] and saved["data_source"] == "hub"
    assert (run_dir(tmp_path / "runs", "lora", 42) / "metrics.json").exists()
