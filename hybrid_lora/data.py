"""Domains by name -> texts -> fixed-length tokenized tensors -> DataLoaders.

Sources (`cfg.data_source`):
- "hub": Hugging Face datasets (`HUB_DOMAINS`, or any "<dataset>[@<config>]:<column>"),
  shuffled with `data_seed`.
- "local": `<data_dir>/<domain>.jsonl`, rows `{"text": str, "split": "train"|"test", ...}`.
- "builtin": a small three-domain corpus generated here from a seeded RNG (no files, no network).

`stage_train_set` builds what a stage trains on: the current domain, plus a replay buffer of
earlier domains, the union of all domains so far ("cumulative"), or of all domains ("all":
multitask training).

Labels are the input ids with padding positions, found from the attention mask
(not from the token id, since pad = eos), set to -100.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler, Subset, TensorDataset

from .config import HUB_DOMAINS, ExperimentConfig
from .sources import hub_id

IGNORE_INDEX = -100


# ------------------------------------------------------------------ text sources
class DomainTexts(NamedTuple):
    """One domain's texts: `n_train` training texts drawn with the train seed, `n_eval`
    evaluation texts and `n_val` validation texts drawn with `data_seed` (the same for every
    run seed; validation is carved out of the training pool, so never trained on)."""
    train: list[str]
    eval: list[str]
    val: list[str]


def train_seed(cfg: ExperimentConfig, seed: int | None) -> int:
    """The seed of the training subset: `cfg.train_data_seed` if set, else the run's `seed`
    (each seed trains on its own sample, so data noise is in seed-level intervals), else
    `data_seed` (no run seed given)."""
    if cfg.train_data_seed is not None:
        return cfg.train_data_seed
    return cfg.data_seed if seed is None else seed


def load_texts(cfg: ExperimentConfig, domain: str, seed: int | None = None) -> DomainTexts:
    """One domain's (train, eval, val) texts for the run seed `seed` (see `train_seed`)."""
    if cfg.data_source == "hub":
        return _hub_texts(cfg, domain, train_seed(cfg, seed))
    if cfg.data_source == "local":
        return _local_texts(cfg, domain, train_seed(cfg, seed))
    return DomainTexts(_builtin_texts(domain, cfg.n_train, 0, train_seed(cfg, seed))[0],
                       _builtin_texts(domain, cfg.n_train, cfg.n_eval, cfg.data_seed)[1],
                       _builtin_texts(domain, cfg.n_val, 0, f"val-{cfg.data_seed}")[0])


def _take(texts: list[str], n: int, seed: int, what: str) -> list[str]:
    if len(texts) < n:
        raise ValueError(f"{what}: asked for {n} samples, only {len(texts)} available")
    order = random.Random(seed).sample(range(len(texts)), n)
    return [texts[i] for i in order]


def _carve(pool: list[str], cfg: ExperimentConfig, seed: int, what: str) -> tuple[list[str], list[str]]:
    """(train, val) from one training pool: `n_val` texts fixed by data_seed, then `n_train` of
    the rest drawn with `seed`. With n_val = 0 and seed = data_seed: the draw of schema <= 3."""
    if len(pool) < cfg.n_train + cfg.n_val:
        raise ValueError(f"{what}: asked for {cfg.n_train} train + {cfg.n_val} validation samples, "
                         f"only {len(pool)} available")
    held = set(random.Random(f"val-{cfg.data_seed}").sample(range(len(pool)), cfg.n_val))
    rest = [t for i, t in enumerate(pool) if i not in held]
    return _take(rest, cfg.n_train, seed, what), [pool[i] for i in sorted(held)]


def _local_texts(cfg: ExperimentConfig, domain: str, seed: int) -> DomainTexts:
    path = Path(cfg.data_dir) / f"{domain}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"domain {domain!r}: no file {path} (data_dir={cfg.data_dir!r})")
    splits: dict[str, list[str]] = {"train": [], "test": []}
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:  # (a byte-order mark at the start, as some editors write, is dropped)
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {raw[err.start]:#04x} at byte "
                                 f"{err.start + 1} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({err.msg}, column "
                                 f"{err.colno})") from None
            if not isinstance(row, dict) or row.get("split") not in splits or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{line_no}: need 'text' (str) and 'split' in {list(splits)}")
            splits[row["split"]].append(row["text"])
    train, val = _carve(splits["train"], cfg, seed, f"{path} train")
    return DomainTexts(train, _take(splits["test"], cfg.n_eval, cfg.data_seed, f"{path} test"), val)


def hub_source(domain: str) -> tuple[str, str | None, str, str | None, str]:
    """(dataset, config or None, train split, eval split or None, text column) of a hub domain:
    a HUB_DOMAINS name, or "<dataset>[@<config>]:<column>" (splits "train" and "test"; with no
    "test" split the evaluation texts are held out of the shuffled train split). An old
    unnamespaced dataset id ("ag_news") becomes its canonical one (`sources.hub_id`)."""
    if domain in HUB_DOMAINS:
        name, train_split, eval_split, column = HUB_DOMAINS[domain]
        return name, None, train_split, eval_split, column
    dataset, sep, column = domain.rpartition(":")
    if not sep or not dataset or not column:
        raise ValueError(f"hub domain {domain!r}: write '<dataset>[@<config>]:<text column>'")
    name, _, config = dataset.partition("@")
    return hub_id(name), config or None, "train", "test", column


def _hub_texts(cfg: ExperimentConfig, domain: str, seed: int) -> DomainTexts:
    """The train split shuffled with data_seed: evaluation texts (when the dataset has no eval
    split) from its end, validation texts before them, the training subset drawn from the rest
    with `seed`."""
    from datasets import load_dataset  # imported here: only the hub path needs it

    name, config, train_split, eval_split, column = hub_source(domain)
    ds = load_dataset(name, config)
    if column not in ds[train_split].column_names:
        raise ValueError(f"hub domain {domain!r}: no column {column!r}; "
                         f"columns: {ds[train_split].column_names}")
    pool = ds[train_split].shuffle(seed=cfg.data_seed)
    held_eval = eval_split is None or eval_split not in ds
    n_eval_held = cfg.n_eval if held_eval else 0
    need = cfg.n_train + cfg.n_val + n_eval_held
    if len(pool) < need:
        raise ValueError(f"hub dataset {name!r}/{train_split}: asked for {need}, has {len(pool)}")
    end = len(pool) - n_eval_held
    val = _rows(pool, end - cfg.n_val, end, column)
    rest = pool.select(range(end - cfg.n_val)).shuffle(seed=seed)
    train = _rows(rest, 0, cfg.n_train, column)
    if held_eval:
        return DomainTexts(train, _rows(pool, end, len(pool), column), val)
    test = ds[eval_split].shuffle(seed=cfg.data_seed)
    if len(test) < cfg.n_eval:
        raise ValueError(f"hub dataset {name!r}/{eval_split}: asked for {cfg.n_eval}, has {len(test)}")
    return DomainTexts(train, _rows(test, 0, cfg.n_eval, column), val)


def _rows(ds, start: int, stop: int, column: str) -> list[str]:
    """`column` of rows start..stop-1 of a datasets.Dataset ([] when empty: `select` of an empty
    range at the end of a dataset raises IndexError in datasets 5)."""
    return list(ds.select(range(start, stop))[column]) if stop > start else []


_SUBJECTS = {
    "imdb": ["the film", "this movie", "the director", "the plot", "the lead actor",
             "the soundtrack", "the script", "the ending", "the cast", "the sequel"],
    "yelp": ["the waiter", "the pasta", "our table", "the service", "the pizza",
             "the dessert", "the menu", "the chef", "the coffee", "the staff"],
}
_VERBS = {
    "imdb": ["was", "felt", "looked", "seemed", "turned out"],
    "yelp": ["was", "tasted", "came out", "seemed", "smelled"],
}
_ADJECTIVES = ["great", "awful", "boring", "wonderful", "slow", "fresh", "bland", "brilliant",
               "cold", "funny", "rude", "friendly", "long", "perfect", "cheap", "overrated"]
_ENDINGS = {
    "imdb": ["I would watch it again.", "Skip this one.", "Ten out of ten.", "Wait for the DVD."],
    "yelp": ["We will be back.", "Never again.", "Five stars.", "Tip the staff well."],
}


_NAMES = ["x", "y", "total", "count", "items", "value", "key", "row", "name", "data"]
_CALLS = ["len", "sum", "max", "min", "sorted", "str", "int", "abs"]


def _builtin_texts(domain: str, n_train: int, n_eval: int, seed) -> tuple[list[str], list[str]]:
    """Templated reviews (movies for 'imdb', restaurants for 'yelp') or small Python
    functions ('code'); seeded, so reproducible."""
    rng = random.Random(f"{domain}-{seed}")

    def function() -> str:
        args = rng.sample(_NAMES, 2)
        body = [f"    {rng.choice(_NAMES)} = {rng.choice(_CALLS)}({rng.choice(args)})"
                for _ in range(rng.randint(1, 3))]
        return "\n".join([f"def {rng.choice(_NAMES)}_{rng.randint(0, 9)}({', '.join(args)}):"]
                         + body + [f"    return {rng.choice(args)}"])

    def review() -> str:
        if domain == "code":
            return function()
        sentences = [f"{rng.choice(_SUBJECTS[domain]).capitalize()} {rng.choice(_VERBS[domain])} "
                     f"{rng.choice(_ADJECTIVES)}." for _ in range(rng.randint(2, 5))]
        return " ".join(sentences + [rng.choice(_ENDINGS[domain])])

    texts = [review() for _ in range(n_train + n_eval)]
    return texts[:n_train], texts[n_train:]


# ------------------------------------------------------------------ tokenization
def tokenize(texts: list[str], tokenizer, max_length: int) -> TensorDataset:
    """Fixed-length (input_ids, attention_mask, labels), each [N, max_length]; pad = eos."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    input_ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)  # by mask: a real eos is still learned
    return TensorDataset(input_ids, mask, labels)


class EpochSampler(Sampler[int]):
    """Indices of a permutation that depends only on (seed, stage, epoch), from a start offset.

    Unlike `shuffle=True` (one generator advanced epoch after epoch), any epoch's order can
    be rebuilt on its own, so a run resumed mid-epoch sees the same remaining batches.
    Call `set_epoch(stage, epoch, skip)` before iterating; `skip` indices are left out.
    """

    def __init__(self, n: int, seed: int, length: int | None = None):
        if length is not None and not 1 <= length <= n:
            raise ValueError(f"length={length}: must be between 1 and the dataset size {n}")
        self.n, self.seed, self.length = n, seed, n if length is None else length
        self.stage, self.epoch, self.skip = 0, 0, 0

    def set_epoch(self, stage: int, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.length:
            raise ValueError(f"skip={skip}: must be between 0 and the epoch length {self.length}")
        self.stage, self.epoch, self.skip = stage, epoch, skip

    def permutation(self) -> torch.Tensor:
        """This epoch's first `length` indices of a permutation of range(n)."""
        key = np.random.SeedSequence([self.seed, self.stage, self.epoch]).generate_state(1)[0]
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(int(key)))[:self.length]

    def __iter__(self):
        return iter(self.permutation()[self.skip:].tolist())

    def __len__(self) -> int:
        return self.length - self.skip


def train_loader(cfg: ExperimentConfig, dataset, seed: int, length: int | None = None) -> DataLoader:
    """A loader over an `EpochSampler(len(dataset), seed, length)`."""
    # The loader's own generator: creating an iterator must not draw from the global RNG,
    # which also drives LoRA dropout (a resumed run restores that RNG and must match).
    return DataLoader(dataset, batch_size=cfg.batch_size,
                      sampler=EpochSampler(len(dataset), seed, length), generator=torch.Generator())


class Loaders(NamedTuple):
    """One domain's loaders: train (over an `EpochSampler`), eval and val (fixed order; val is
    None when n_val = 0)."""
    train: DataLoader
    eval: DataLoader
    val: DataLoader | None


def eval_loader(cfg: ExperimentConfig, dataset) -> DataLoader:
    """Fixed order, with its own generator: iterating it draws nothing from the global RNG
    (which drives LoRA dropout: evaluating must not change training)."""
    return DataLoader(dataset, batch_size=cfg.eval_batch_size or cfg.batch_size, generator=torch.Generator())


def make_loaders(cfg: ExperimentConfig, tokenizer, domain: str, seed: int) -> Loaders:
    """The loaders of one domain for run seed `seed` (the training sampler's seed, and the
    training subset's unless `train_data_seed` is fixed). ValueError when its training or
    evaluation texts hold no token to predict (all empty, say)."""
    texts = load_texts(cfg, domain, seed)
    sets = {part: tokenize(rows, tokenizer, cfg.max_length)
            for part, rows in texts._asdict().items() if rows}  # no "val" when n_val = 0
    for part in ("train", "eval"):
        # labels[:, 0] is never predicted: the first token has nothing before it
        if not (sets[part].tensors[2][:, 1:] != IGNORE_INDEX).any():
            raise ValueError(f"domain {domain!r}: its {len(getattr(texts, part))} {part} texts "
                             "hold no token to predict (empty, or one token each)")
    val = eval_loader(cfg, sets["val"]) if "val" in sets else None
    return Loaders(train_loader(cfg, sets["train"], seed), eval_loader(cfg, sets["eval"]), val)


def fingerprint(loaders: Loaders) -> str:
    """16 hex digits of SHA-256 over the token ids and masks of a domain's train, eval and val
    sets: exactly what a run sees, so any change of texts, selection or tokenizer shows."""
    h = hashlib.sha256()
    for loader in loaders:
        for t in loader.dataset.tensors[:2] if loader is not None else ():
            h.update(f"{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def replay_indices(n: int, k: int, data_seed: int, domain: str) -> list[int]:
    """The replay buffer of an earlier domain: k of its n training indices, fixed by data_seed."""
    return sorted(random.Random(f"replay-{domain}-{data_seed}").sample(range(n), k))


def stage_train_set(cfg: ExperimentConfig, train_sets: list, stage: int, data: str):
    """(dataset, epoch length or None) that stage `stage` (1-based) trains on, given each
    domain's training set: "current" its own domain; "replay" also a buffer of
    round(replay_fraction * n) samples of every earlier domain (the epoch grows by the buffer);
    "cumulative" the union of domains 1..stage, "all" the union of every domain (in every
    stage, Stage 1 included), both with epochs of one domain's length (the same number of
    steps as the other methods)."""
    current = train_sets[stage - 1]
    if data == "all":
        return ConcatDataset(train_sets), len(current)
    if data == "current" or stage == 1:
        return current, None
    earlier = list(zip(cfg.domains[:stage - 1], train_sets[:stage - 1]))
    if data == "replay":
        buffers = [Subset(ds, replay_indices(len(ds), k, cfg.data_seed, d)) for d, ds in earlier
                   if (k := round(cfg.replay_fraction * len(ds))) > 0]
        return ConcatDataset([current] + buffers), None
    if data == "cumulative":
        return ConcatDataset([ds for _, ds in earlier] + [current]), len(current)
    raise ValueError(f"data={data!r}: must be 'current', 'replay', 'cumulative' or 'all'")
