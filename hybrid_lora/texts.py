"""A domain's texts: where they come from and which are trained on, evaluated, validated.

Domains (`cfg.domains`, one per stage) are read by `cfg.data_source`:
- "hub": a shipped name (`config.HUB_DOMAINS`: imdb, yelp, code) or a dataset spec (below).
- "local": `<data_dir>/<domain>.jsonl`, rows `{"text": str, "split": "train"|"test", ...}`.
- "builtin": a small three-domain corpus generated here from a seeded RNG (no files, no network).
A dataset spec is read with `datasets` whatever the source, so specs and shipped names mix.

A dataset spec is `<source>[@<config>]:<column>[:<train split>[:<eval split>]]` (`parse_domain`):
`<source>` is a hub id, a local dataset folder (its splits from its file names, as
`datasets.load_dataset` reads one), or one local `.jsonl`, `.json`, `.csv`, `.parquet` or `.txt`
file (a `.txt` file is one text per line, column `text`, which may be left out). A single file is
one split, "train", unless it has a `split` column, whose values are then its splits. Splits
default to "train" and "test"; when the default "test" does not exist, the evaluation texts are
held out of the shuffled train split. A `messages` column of chat turns ([{"role", "content"}])
is rendered with the tokenizer's chat template when tokenized (`data.tokenize`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

from .config import HUB_DOMAINS, ExperimentConfig
from .sources import DATA_FILE_BUILDERS, hub_id

SPEC = "'<dataset>[@<config>]:<text column>[:<train split>[:<eval split>]]'"


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
    if cfg.data_source == "hub" or is_spec(domain):  # a spec is read so whatever the source
        return _hub_texts(cfg, domain, train_seed(cfg, seed))
    if cfg.data_source == "local":
        return _local_texts(cfg, domain, train_seed(cfg, seed))
    return DomainTexts(_builtin_texts(domain, cfg.n_train, 0, train_seed(cfg, seed))[0],
                       _builtin_texts(domain, cfg.n_train, cfg.n_eval, cfg.data_seed)[1],
                       _builtin_texts(domain, cfg.n_val, 0, f"val-{cfg.data_seed}")[0])


def is_spec(domain: str) -> bool:
    """Whether a domain is a dataset spec (a column after ':', or a local data file)."""
    return ":" in domain or is_file_spec(domain)


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


class DatasetSpec(NamedTuple):
    """A domain read with `datasets`: source (hub id, folder or file), config, splits, column."""
    dataset: str
    config: str | None
    train_split: str
    eval_split: str | None  # None: held out of the train split
    column: str
    eval_named: bool = False  # the spec names the eval split: it must exist


def is_file_spec(dataset: str) -> bool:
    """Whether a spec's source names a local data file (by its suffix, `DATA_FILE_BUILDERS`)."""
    return Path(dataset).suffix.lower() in DATA_FILE_BUILDERS


def parse_domain(domain: str) -> DatasetSpec:
    """The `DatasetSpec` of a HUB_DOMAINS name or of a dataset spec (module docstring); an old
    unnamespaced hub id ("ag_news") becomes its canonical one (`sources.hub_id`)."""
    if domain in HUB_DOMAINS:
        name, train_split, eval_split, column = HUB_DOMAINS[domain]
        return DatasetSpec(name, None, train_split, eval_split, column)
    dataset, *rest = domain.split(":")
    if not rest and Path(dataset).suffix.lower() == ".txt":
        rest = ["text"]
    if not dataset or not 1 <= len(rest) <= 3 or not all(rest):
        raise ValueError(f"domain {domain!r}: write {SPEC}")
    name, _, config = dataset.partition("@")
    column, train_split, eval_split = (rest + [None, None])[:3]
    return DatasetSpec(name if is_file_spec(name) else hub_id(name), config or None, train_split or "train",
                       eval_split or "test", column, eval_named=eval_split is not None)


def hub_source(domain: str) -> tuple[str, str | None, str, str | None, str]:
    """(dataset, config or None, train split, eval split or None, text column) of a domain."""
    return tuple(parse_domain(domain))[:5]


def open_dataset(spec: DatasetSpec):
    """The `datasets.DatasetDict` of a spec: a local file by its builder (a `split` column makes
    its splits), else `load_dataset(id or folder, config)`."""
    from datasets import DatasetDict, load_dataset  # imported here: only this path needs it

    if not is_file_spec(spec.dataset):
        return load_dataset(spec.dataset, spec.config)
    path = Path(spec.dataset).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path}: not there")
    ds = load_dataset(DATA_FILE_BUILDERS[path.suffix.lower()], data_files={"train": str(path)})["train"]
    if "split" not in ds.column_names:
        return DatasetDict(train=ds)
    names = sorted(set(ds["split"]), key=str)
    return DatasetDict({str(s): ds.filter(lambda v, s=s: v == s, input_columns="split") for s in names})


def check_spec(domain: str, spec: DatasetSpec, ds) -> None:
    """ValueError naming the splits or columns that exist when the spec's are not there."""
    where = f"domain {domain!r} ({spec.dataset})"
    for split in (spec.train_split,) + ((spec.eval_split,) if spec.eval_named else ()):
        if split not in ds:
            raise ValueError(f"{where}: no split {split!r}; splits: {list(ds)}")
    if spec.column not in ds[spec.train_split].column_names:
        raise ValueError(f"{where}: no column {spec.column!r}; columns: {ds[spec.train_split].column_names}")


def _hub_texts(cfg: ExperimentConfig, domain: str, seed: int) -> DomainTexts:
    """A dataset spec's texts: the train split shuffled with data_seed: evaluation texts (when the
    dataset has no eval split) from its end, validation texts before them, the training subset
    drawn from the rest with `seed`."""
    spec = parse_domain(domain)
    ds = open_dataset(spec)
    check_spec(domain, spec, ds)
    name, train_split, eval_split, column = spec.dataset, spec.train_split, spec.eval_split, spec.column
    pool = ds[train_split].shuffle(seed=cfg.data_seed)
    held_eval = eval_split is None or eval_split not in ds
    n_eval_held = cfg.n_eval if held_eval else 0
    need = cfg.n_train + cfg.n_val + n_eval_held
    if len(pool) < need:
        raise ValueError(f"dataset {name!r}/{train_split}: asked for {need}, has {len(pool)}")
    end = len(pool) - n_eval_held
    val = _rows(pool, end - cfg.n_val, end, column)
    rest = pool.select(range(end - cfg.n_val)).shuffle(seed=seed)
    train = _rows(rest, 0, cfg.n_train, column)
    if held_eval:
        return DomainTexts(train, _rows(pool, end, len(pool), column), val)
    test = ds[eval_split].shuffle(seed=cfg.data_seed)
    if len(test) < cfg.n_eval:
        raise ValueError(f"dataset {name!r}/{eval_split}: asked for {cfg.n_eval}, has {len(test)}")
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
