"""Your own data: a domain may be a dataset spec `<source>[@<config>]:<column>[:<train>[:<eval>]]`
with a hub id, a local dataset folder, or a local .jsonl/.csv/.parquet/.txt file; a `messages`
column is rendered with the tokenizer's chat template; missing columns, splits and files get one
line naming what exists. Every file here is written by the test."""
import dataclasses
import json

import pandas as pd
import pytest

from hybrid_lora.cli import main
from hybrid_lora.config import ExperimentConfig
from hybrid_lora.data import make_loaders, tokenize
from hybrid_lora.models import byte_tokenizer
from hybrid_lora.results import read_json, run_dir
from hybrid_lora.texts import load_texts, parse_domain

from conftest import tiny_config

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")


def rows(prefix: str, n: int) -> list[str]:
    return [f"{prefix} number {i}: a short text of its own." for i in range(n)]


def cfg_for(*domains, **changes) -> ExperimentConfig:
    return tiny_config(domains=tuple(domains), n_train=10, n_eval=6, n_val=3, **changes)


@pytest.fixture
def files(tmp_path):
    """The same 30 texts as .jsonl, .csv, .parquet and .txt (column 'body'; .txt: one per line)."""
    texts = rows("review", 30)
    df = pd.DataFrame({"body": texts, "stars": range(30)})
    df.to_json(tmp_path / "r.jsonl", orient="records", lines=True)
    df.to_csv(tmp_path / "r.csv", index=False)
    df.to_parquet(tmp_path / "r.parquet")
    (tmp_path / "r.txt").write_text("\n".join(texts) + "\n")
    return tmp_path, texts


@pytest.mark.parametrize("name, column", [("r.jsonl", ":body"), ("r.csv", ":body"), ("r.parquet", ":body"),
                                          ("r.txt", ""), ("r.txt", ":text")])
def test_a_local_file_is_a_domain_with_held_out_eval_and_val_texts(files, name, column):
    folder, texts = files
    got = load_texts(cfg_for(f"{folder / name}{column}", "code"), f"{folder / name}{column}", seed=1)
    assert (len(got.train), len(got.eval), len(got.val)) == (10, 6, 3)
    used = got.train + got.eval + got.val
    assert set(used) <= set(texts) and len(set(used)) == 19  # drawn from the file, never twice
    # the same draw from every file type, the training subset by the run seed only
    again = load_texts(cfg_for(f"{folder / 'r.csv'}:body", "code"), f"{folder / 'r.csv'}:body", seed=1)
    assert got == again
    other = load_texts(cfg_for(f"{folder / name}{column}", "code"), f"{folder / name}{column}", seed=2)
    assert other.eval == got.eval and other.val == got.val and other.train != got.train


def test_a_split_column_makes_the_splits_and_named_splits_are_used(tmp_path):
    train, test = rows("train text", 20), rows("test text", 8)
    with (tmp_path / "d.jsonl").open("w") as f:
        for t in train:
            f.write(json.dumps({"content": t, "split": "tr"}) + "\n")
        for t in test:
            f.write(json.dumps({"content": t, "split": "ev"}) + "\n")
    spec = f"{tmp_path / 'd.jsonl'}:content:tr:ev"
    got = load_texts(cfg_for(spec, "code"), spec, seed=0)
    assert set(got.eval) <= set(test) and set(got.train + got.val) <= set(train)
    with pytest.raises(ValueError, match=r"no split 'test'; splits: \['ev', 'tr'\]"):
        bad = f"{tmp_path / 'd.jsonl'}:content:tr:test"
        load_texts(cfg_for(bad, "code"), bad, seed=0)


def test_a_local_dataset_folder_reads_its_splits_from_file_names(tmp_path):
    (tmp_path / "ds").mkdir()
    pd.DataFrame({"text": rows("train", 20)}).to_csv(tmp_path / "ds" / "train.csv", index=False)
    pd.DataFrame({"text": rows("valid", 8)}).to_csv(tmp_path / "ds" / "validation.csv", index=False)
    spec = f"{tmp_path / 'ds'}:text:train:validation"
    got = load_texts(cfg_for(spec, "code"), spec, seed=0)
    assert set(got.eval) <= set(rows("valid", 8)) and set(got.train) <= set(rows("train", 20))
    assert parse_domain(spec).dataset == str(tmp_path / "ds")  # a local folder is never a hub id


def test_chat_messages_are_rendered_with_the_chat_template(tmp_path):
    chats = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
             for i in range(25)]
    with (tmp_path / "chat.jsonl").open("w") as f:
        for c in chats:
            f.write(json.dumps({"messages": c}) + "\n")
    spec = f"{tmp_path / 'chat.jsonl'}:messages"
    got = load_texts(cfg_for(spec, "code"), spec, seed=0)
    assert all(c in chats for c in got.train)
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="chat messages, but the tokenizer has no chat template"):
        tokenize(got.train, tok, 48)
    tok.chat_template = CHAT_TEMPLATE
    rendered = [f"<user>{c[0]['content']}\n<assistant>{c[1]['content']}\n" for c in got.train]
    assert tokenize(got.train, tok, 48).tensors[0].tolist() == tokenize(rendered, tok, 48).tensors[0].tolist()
    with pytest.raises(ValueError, match="a text is int 3, not a string nor chat messages"):
        tokenize(["fine", 3], tok, 48)


def test_missing_columns_splits_files_and_bad_specs_are_named(files):
    folder, _ = files
    spec = f"{folder / 'r.csv'}:review"
    with pytest.raises(ValueError, match=r"no column 'review'; columns: \['body', 'stars'\]"):
        load_texts(cfg_for(spec, "code"), spec, seed=0)
    spec = f"{folder / 'r.csv'}:body:training"
    with pytest.raises(ValueError, match=r"no split 'training'; splits: \['train'\]"):
        load_texts(cfg_for(spec, "code"), spec, seed=0)
    with pytest.raises(FileNotFoundError, match="data file .*gone.csv: not there"):
        load_texts(cfg_for(f"{folder / 'gone.csv'}:body", "code"), f"{folder / 'gone.csv'}:body", seed=0)
    with pytest.raises(ValueError, match="write '<dataset>"):
        parse_domain("a:b:c:d:e")
    with pytest.raises(ValueError, match="asked for 34, has 30"):
        big = f"{folder / 'r.csv'}:body"
        load_texts(dataclasses.replace(cfg_for(big, "code"), n_train=25), big, seed=0)
    with pytest.raises(ValueError, match="unknown hub domain 'reviews.xlsx'"):
        ExperimentConfig(domains=("reviews.xlsx", "imdb"))


def test_a_run_on_your_own_files_from_the_command_line(files, tmp_path, capsys):
    folder, _ = files
    code = [f"def f{i}(x):\n    return x + {i}\n" for i in range(30)]
    pd.DataFrame({"source": code}).to_parquet(tmp_path / "code.parquet")
    domains = f"{folder / 'r.csv'}:body,{tmp_path / 'code.parquet'}:source"
    assert main(["run", "--preset", "smoke", "--methods", "lora", "--no-progress", "--out", str(tmp_path / "o"),
                 "--set", f"domains={domains}", "n_train=12", "n_eval=6", "n_val=4", "max_length=32",
                 "epochs_stage1=1", "epochs_stage2=1", "rank_schedule=8"]) == 0
    run = run_dir(tmp_path / "o", "lora", 42)
    saved = read_json(run / "config.json")
    assert saved["domains"] == [f"{folder / 'r.csv'}:body", f"{tmp_path / 'code.parquet'}:source"]
    metrics = read_json(run / "metrics.json")
    assert metrics["B_after_stage2"]["loss"] < metrics["B_base"]["loss"]  # it learned the code file
    cfg = ExperimentConfig.from_dict(saved)
    loaders = make_loaders(cfg, byte_tokenizer(), cfg.domains[1], 42)
    assert len(loaders.train.dataset) == 12 and len(loaders.eval.dataset) == 6
