import json

import pytest
import torch

from hybrid_lora.adapters import byte_tokenizer
from hybrid_lora.data import IGNORE_INDEX, load_texts, make_loaders, tokenize

from conftest import SHARED_DATA, tiny_config


def test_labels_are_ids_with_padding_masked_by_attention_mask_not_by_token_id():
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    ds = tokenize(["ab" + tok.eos_token + "c", "xyz" * 20], tok, max_length=10)
    ids, mask, labels = ds.tensors
    assert ids.shape == mask.shape == labels.shape == (2, 10)
    assert mask[0].tolist() == [1] * 4 + [0] * 6 and mask[1].tolist() == [1] * 10
    assert ids[0, 2].item() == eos and labels[0, 2].item() == eos  # a real eos is learned
    assert labels[0, 4:].tolist() == [IGNORE_INDEX] * 6 and ids[0, 4:].tolist() == [eos] * 6
    assert torch.equal(labels[1], ids[1])


def write_jsonl(path, n_train, n_test):
    with open(path, "w") as f:
        for i in range(n_train):
            f.write(json.dumps({"text": f"train {i}", "split": "train", "label": 0}) + "\n")
        for i in range(n_test):
            f.write(json.dumps({"text": f"test {i}", "split": "test"}) + "\n")


def test_local_jsonl_draws_samples_by_data_seed(tmp_path):
    write_jsonl(tmp_path / "imdb.jsonl", 30, 10)
    cfg = tiny_config(data_source="local", data_dir=str(tmp_path), n_train=20, n_eval=5)
    train, evals = load_texts(cfg, "imdb")
    assert len(train) == 20 == len(set(train)) and all(t.startswith("train") for t in train)
    assert len(evals) == 5 and all(t.startswith("test") for t in evals)
    assert load_texts(cfg, "imdb") == (train, evals)
    other = tiny_config(data_source="local", data_dir=str(tmp_path), n_train=20, n_eval=5, data_seed=7)
    assert load_texts(other, "imdb")[0] != train


def test_local_errors_name_the_problem(tmp_path):
    cfg = tiny_config(data_source="local", data_dir=str(tmp_path), n_train=20, n_eval=5)
    with pytest.raises(FileNotFoundError, match="yelp.jsonl"):
        load_texts(cfg, "yelp")
    write_jsonl(tmp_path / "yelp.jsonl", 3, 10)
    with pytest.raises(ValueError, match="asked for 20 samples, only 3"):
        load_texts(cfg, "yelp")


def test_builtin_corpus_is_reproducible_and_domains_differ():
    cfg = tiny_config()
    a_train, a_eval = load_texts(cfg, "imdb")
    b_train, _ = load_texts(cfg, "yelp")
    assert (a_train, a_eval) == load_texts(cfg, "imdb")
    assert len(a_train) == cfg.n_train and len(a_eval) == cfg.n_eval
    assert any("film" in t or "movie" in t for t in a_train)
    assert not any("film" in t or "movie" in t for t in b_train)


def test_train_loader_order_follows_the_seed():
    cfg = tiny_config()
    tok = byte_tokenizer()
    first = [b[0] for b in make_loaders(cfg, tok, "imdb", seed=1)[0]]
    again = [b[0] for b in make_loaders(cfg, tok, "imdb", seed=1)[0]]
    other = [b[0] for b in make_loaders(cfg, tok, "imdb", seed=2)[0]]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
def test_shared_data_supports_the_paper_protocol():
    for domain in ("imdb", "yelp", "code"):
        cfg = tiny_config(data_source="local", data_dir=str(SHARED_DATA), n_train=3000, n_eval=1000)
        train, evals = load_texts(cfg, domain)
        assert len(train) == 3000 and len(evals) == 1000
        if domain != "code":  # code.jsonl itself has 23 test chunks identical to train chunks
            assert not set(train) & set(evals)


def test_epoch_sampler_orders_depend_only_on_seed_stage_epoch():
    from hybrid_lora.data import EpochSampler

    s = EpochSampler(50, seed=7)
    s.set_epoch(1, 2)
    full = list(s)
    assert sorted(full) == list(range(50))
    s.set_epoch(2, 1)
    other_stage = list(s)
    s.set_epoch(1, 3)
    other_epoch = list(s)
    assert full != other_stage and full != other_epoch
    t = EpochSampler(50, seed=7)  # a new sampler (a resumed run) rebuilds any epoch on its own
    t.set_epoch(1, 2, skip=12)
    assert list(t) == full[12:] and len(t) == 38
    with pytest.raises(ValueError, match="skip=51"):
        t.set_epoch(1, 2, skip=51)


def test_iterating_the_train_loader_leaves_the_global_rng_alone(cfg):
    train, _ = make_loaders(cfg, byte_tokenizer(), "imdb", seed=1)
    train.sampler.set_epoch(1, 1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in train:
        pass
    assert torch.equal(torch.rand(3), expected)
