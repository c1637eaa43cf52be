"""A domain's texts -> fixed-length tokenized tensors -> DataLoaders.

Where the texts come from (hub, local files, the built-in corpus) is `texts`; this module
tokenizes them (chat messages through the tokenizer's chat template), samples epochs, and builds
what a stage trains on (`stage_train_set`): the current domain, plus a replay buffer of earlier
domains, the union of all domains so far ("cumulative"), or of all domains ("all": multitask
training).

Labels are the input ids with padding positions, found from the attention mask
(not from the token id, since pad = eos), set to -100.
"""
from __future__ import annotations

import hashlib
import random
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler, Subset, TensorDataset

from .config import ExperimentConfig
from .texts import DomainTexts, hub_source, load_texts, parse_domain  # noqa: F401 - also imported from here

IGNORE_INDEX = -100


# ------------------------------------------------------------------ tokenization
def is_chat(item) -> bool:
    """Whether a text is chat messages: a list of {"role", "content"} mappings."""
    return isinstance(item, list) and bool(item) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                       for m in item)


def as_text(item, tokenizer) -> str:
    """A text as a string: chat messages rendered with the tokenizer's chat template."""
    if isinstance(item, str):
        return item
    if is_chat(item):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the texts are chat messages, but the tokenizer has no chat template "
                             f"({type(tokenizer).__name__}); use a chat model's tokenizer, or a text column")
        return tokenizer.apply_chat_template(item, tokenize=False)
    shown = repr(item)[:60]
    raise ValueError(f"a text is {type(item).__name__} {shown}, not a string nor chat messages "
                     "([{'role': ..., 'content': ...}, ...]); choose a text column")


def tokenize(texts: list, tokenizer, max_length: int) -> TensorDataset:
    """Fixed-length (input_ids, attention_mask, labels), each [N, max_length]; pad = eos.
    `texts` are strings or chat messages (`as_text`)."""
    texts = [as_text(t, tokenizer) for t in texts]
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
