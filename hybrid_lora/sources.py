"""Where base models and datasets come from: hub ids (old unnamespaced names translated) and
GGUF files. Plain Python: no torch, no transformers.

Recent `huggingface_hub` (1.x and later) refuses repository ids without a namespace
("Repository id must be 'namespace/name', got 'imdb'"), so `load_dataset("imdb")` and
`from_pretrained("gpt2")` fail there. `hub_id` translates the few old names users type to
their canonical ids (one printed line the first time each is translated); any other id passes
through unchanged, and a local file or folder of the same name always wins.

A GGUF base model is named by its file (`path/to/model.gguf`) or by a folder that holds one
GGUF file and no config.json (`gguf_location`). A local data file is read by the `datasets`
builder of its suffix (`DATA_FILE_BUILDERS`).
"""
from __future__ import annotations

from pathlib import Path

# old name -> canonical id (models and datasets; no name is both)
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
    "imdb": "stanfordnlp/imdb",
    "sst2": "stanfordnlp/sst2",
    "yelp_polarity": "fancyzhx/yelp_polarity",
    "yelp_review_full": "Yelp/yelp_review_full",
    "ag_news": "fancyzhx/ag_news",
    "amazon_polarity": "fancyzhx/amazon_polarity",
    "dbpedia_14": "fancyzhx/dbpedia_14",
    "wikitext": "Salesforce/wikitext",
    "squad": "rajpurkar/squad",
    "cnn_dailymail": "abisee/cnn_dailymail",
}
_announced: set[str] = set()
# a local data file's suffix -> the datasets builder that reads it
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def hub_id(name: str, quiet: bool = False) -> str:
    """The id to load `name` by: `name` itself when it is a local path or not an old name in
    HUB_ALIASES, else its canonical id (saying so once per name unless `quiet`)."""
    if name not in HUB_ALIASES or Path(name).expanduser().exists():
        return name
    canonical = HUB_ALIASES[name]
    if not quiet and name not in _announced:
        _announced.add(name)
        print(f"hub id {name!r} is now {canonical!r} (ids without a namespace no longer load); "
              f"using {canonical!r}")
    return canonical


def gguf_location(name: str) -> tuple[Path, str] | None:
    """(folder, file name) when `name` is a GGUF file or a folder holding one GGUF file and no
    config.json; None otherwise. ValueError for a folder with several GGUF files."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.parent, path.name
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"model_name={name!r}: the folder holds several GGUF files ({', '.join(found)}); "
                         "name one, e.g. model_name=" + repr(str(path / found[0])))
    return (path, found[0]) if found else None


def gguf_key(folder: Path, file: str) -> tuple[str, int, int]:
    """(resolved path, size, mtime in ns) of a GGUF file: what per-process caches of it are keyed
    by, so a file replaced on disk is read again."""
    stat = (folder / file).stat()
    return str((folder / file).resolve()), stat.st_size, stat.st_mtime_ns
