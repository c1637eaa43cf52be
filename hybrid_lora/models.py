"""Base models and tokenizers by name: a tiny random model (TINY_MODELS), a local folder, a GGUF
file, or a hub id (old unnamespaced ids translated, `sources.hub_id`).

A GGUF file (`model_name="path/model.gguf"`, needs `pip install gguf`) is read by transformers
(`from_pretrained(folder, gguf_file=...)`) and dequantized to an ordinary fp32 model: the GGUF
quantizer tag transformers leaves on it is removed, so PEFT, `save_pretrained` and merging treat
it as any other model. Dequantizing takes seconds, and a run builds its base several times
(resume, the references of later stages), so the dequantized model and its tokenizer are kept
once per process and every call returns a copy of them.
"""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import torch
from torch import nn

from .config import TINY_MODELS, ExperimentConfig
from .families import build_tiny_model
from .sources import gguf_key, gguf_location, hub_id


def byte_tokenizer():
    """A byte-level tokenizer that needs no download: 256 byte tokens + `<|endoftext|>` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos,
                                   unk_token=eos, pad_token=eos)


# Any of these in a model folder means it has a tokenizer (fast, BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt",
                   "sentencepiece.bpe.model")
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]{0,95}(/[A-Za-z0-9_][\w.-]{0,95})?")


def check_model_source(name: str) -> None:
    """Clear errors before any loading: `name` must be a key of TINY_MODELS, a model folder (with
    a config.json and a tokenizer), a GGUF file (with the `gguf` package installed) or something
    that can be a hub id ("org/name")."""
    if name in TINY_MODELS:
        return
    if gguf_location(name) is not None:
        try:
            import gguf  # noqa: F401 - transformers reads GGUF files with it
        except ImportError:
            raise ImportError(f"model_name={name!r} is a GGUF file: reading it needs the gguf package "
                              "(pip install gguf, or pip install 'hybrid-lora[gguf]')") from None
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_name={name!r}: the folder has no config.json (nor a GGUF "
                                    "file), so it holds no model saved with save_pretrained")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"model_name={name!r}: the folder has no tokenizer (none of "
                                    f"{', '.join(TOKENIZER_FILES)}); save one beside the model with "
                                    f"tokenizer.save_pretrained({name!r})")
        return
    if path.exists():
        raise NotADirectoryError(f"model_name={name!r} is a file but not a .gguf file; give the "
                                 "folder that holds the model, or a GGUF file")
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise FileNotFoundError(f"model_name={name!r}: no such folder, and not a Hugging Face hub "
                                "id ('name' or 'org/name') either")


def load_gguf_model(folder: Path, file: str) -> nn.Module:
    """A copy of the GGUF checkpoint `folder/file` dequantized to fp32, without transformers'
    GGUF quantizer tag (its weights are plain tensors)."""
    return copy.deepcopy(_kept_gguf_model(*gguf_key(folder, file)))


@functools.lru_cache(maxsize=2)
def _kept_gguf_model(path: str, size: int, mtime_ns: int) -> nn.Module:
    """The dequantized model of the GGUF file `path` (size and mtime key the cache); never
    handed out itself, only copies (`freeze_add` merges into its base in place)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # what makes save_pretrained refuse and PEFT think it quantized
    for owner in (model, model.config):
        for attr in ("quantization_config", "is_quantized", "quantization_method"):
            if attr in vars(owner):
                delattr(owner, attr)
    return model.eval()


@functools.lru_cache(maxsize=2)
def _kept_gguf_tokenizer(path: str, size: int, mtime_ns: int):
    """The tokenizer of the GGUF file `path` with the bos and eos tokens its header names
    (transformers 5.15, Colab's, reads SmolLM2's eos as <|im_start|>; 5.24 as the header says,
    <|im_end|>). Handed out only as copies."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    fields = GGUFReader(path).fields
    for role in ("bos", "eos"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(int(field.parts[field.data[0]][0])))
    return tok


def load_tokenizer(cfg: ExperimentConfig):
    """The tokenizer of `cfg.model_name` with pad = eos and right padding."""
    check_model_source(cfg.model_name)
    gguf = gguf_location(cfg.model_name)
    if cfg.model_name in TINY_MODELS:
        tok = byte_tokenizer()
    elif gguf is not None:
        tok = copy.deepcopy(_kept_gguf_tokenizer(*gguf_key(*gguf)))
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(hub_id(cfg.model_name))
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def build_base_model(cfg: ExperimentConfig, vocab_size: int | None = None) -> nn.Module:
    """The frozen base LM. Deterministic: a tiny random model (TINY_MODELS) is seeded with
    `cfg.base_seed` without touching the global RNG, so every call returns identical weights."""
    gguf = gguf_location(cfg.model_name)
    if cfg.model_name in TINY_MODELS:
        base = build_tiny_model(cfg, vocab_size or 257)
    elif gguf is not None:
        base = load_gguf_model(*gguf)
    else:
        base = _from_pretrained(cfg.model_name)
    check_model_fits(cfg, base.get_input_embeddings().num_embeddings, _positions(base.config), vocab_size)
    base.requires_grad_(False)
    return base


def _from_pretrained(name: str, auto: str = "AutoModelForCausalLM"):
    """`AutoModelForCausalLM` (or `auto`, e.g. "AutoConfig") `.from_pretrained` of a folder or hub
    id; ValueError naming its config.json when a field there has the wrong type."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    try:
        return getattr(transformers, auto).from_pretrained(hub_id(name))
    except StrictDataclassError as err:
        where = Path(name) / "config.json" if Path(name).is_dir() else f"the config.json of {name!r}"
        detail = " ".join(str(err).split())
        raise ValueError(f"{where} does not describe a model transformers can build ({detail})") from None


def _positions(config) -> int | None:
    """The longest sequence a model config was built for (n_positions / max_position_embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_model_fits(cfg: ExperimentConfig, rows: int, positions: int | None, vocab_size: int | None) -> None:
    """ValueError when the tokenizer has more tokens (`vocab_size`) than the model's embedding
    has `rows` (ids past its end: an IndexError deep in torch), or max_length is above the
    `positions` the model has."""
    if vocab_size is not None and vocab_size > rows:
        raise ValueError(f"model_name={cfg.model_name!r}: its tokenizer has {vocab_size} tokens but the "
                         f"model's embedding has {rows} rows, so token ids {rows}..{vocab_size - 1} have no "
                         "embedding; give the model the tokenizer it was trained with")
    if positions is not None and cfg.max_length > positions:
        raise ValueError(f"max_length={cfg.max_length} is above the {positions} positions of model_name="
                         f"{cfg.model_name!r} (config n_positions / max_position_embeddings); "
                         f"set max_length <= {positions}")


def check_model_config(cfg: ExperimentConfig) -> None:
    """`check_model_fits` from the model's config.json and tokenizer alone (no weights loaded),
    before any data is read; tiny and GGUF models are checked as they are built."""
    check_model_source(cfg.model_name)
    if cfg.model_name in TINY_MODELS or gguf_location(cfg.model_name) is not None:
        return
    config = _from_pretrained(cfg.model_name, "AutoConfig")
    check_model_fits(cfg, config.vocab_size, _positions(config), len(load_tokenizer(cfg)))
