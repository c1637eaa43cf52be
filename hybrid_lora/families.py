"""Model families: tiny random causal LMs built from configs (no download), the modules LoRA
targets in each architecture, and PEFT's `fan_in_fan_out` read from the module type.

`target_modules` is a list of module names (PEFT's suffix match), `("attention",)` (the
attention projections of the model's family, `ATTENTION_MODULES`) or `("all-linear",)`
(PEFT's meaning: every Linear / Conv1D but the output layer).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from .config import TINY_MODELS, ExperimentConfig
from .sources import gguf_key, gguf_location, hub_id

# model_type (transformers) -> the attention projections LoRA adapts by default
ATTENTION_MODULES = {
    "gpt2": ("c_attn",),  # a Conv1D holding q, k, v: PEFT needs fan_in_fan_out=True
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt_neox": ("query_key_value",),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


def tiny_model_config(cfg: ExperimentConfig, vocab_size: int):
    """The transformers config of the tiny random model `cfg.model_name` (a key of TINY_MODELS):
    `tiny_n_layer` layers of width `tiny_n_embd` with `tiny_n_head` heads, MLP 4x wide, token 0
    as bos / eos / pad (the byte tokenizer's `<|endoftext|>`)."""
    import transformers as tf

    d, layers, heads = cfg.tiny_n_embd, cfg.tiny_n_layer, cfg.tiny_n_head
    positions = max(cfg.max_length, 64)
    ids = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    family = TINY_MODELS[cfg.model_name]
    if family == "gpt2":
        return tf.GPT2Config(n_positions=positions, n_layer=layers, n_embd=d, n_head=heads, **ids)
    if family in ("llama", "qwen2"):
        make = tf.LlamaConfig if family == "llama" else tf.Qwen2Config
        return make(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads,
                    max_position_embeddings=positions, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                num_attention_heads=heads, max_position_embeddings=positions, **ids)
    if family == "opt":
        return tf.OPTConfig(hidden_size=d, ffn_dim=4 * d, num_hidden_layers=layers,
                            num_attention_heads=heads, word_embed_proj_dim=d,
                            max_position_embeddings=positions, **ids)
    raise AssertionError(family)  # TINY_MODELS and this function name the same families


def model_type(model_name: str) -> str | None:
    """The transformers `model_type` of `model_name` without loading weights: from TINY_MODELS,
    a local folder's config.json, a GGUF file's header, or the hub cache; None when it cannot
    be read."""
    if model_name in TINY_MODELS:
        return TINY_MODELS[model_name]
    path = Path(model_name).expanduser() / "config.json"
    try:
        if path.is_file():
            return json.loads(path.read_text()).get("model_type")
        from transformers import AutoConfig
        gguf = gguf_location(model_name)
        if gguf is not None:
            return _gguf_model_type(*gguf_key(*gguf))
        return AutoConfig.from_pretrained(hub_id(model_name, quiet=True)).model_type
    except Exception:  # offline, unknown id: only used to compare spellings of a setting
        return None


@functools.lru_cache(maxsize=8)
def _gguf_model_type(path: str, size: int, mtime_ns: int) -> str:
    """The model_type in a GGUF file's header (reading it takes seconds: once per file)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name).model_type


def canonical_targets(model_name: str, targets) -> tuple[str, ...]:
    """`targets` with "attention" spelled out for the family of `model_name` (where known), so
    a run saved with ("c_attn",) and one asking for ("attention",) on GPT-2 are the same setting."""
    targets = tuple(targets or ())
    family = model_type(model_name)
    if targets == ("attention",) and family in ATTENTION_MODULES:
        return ATTENTION_MODULES[family]
    return targets


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted last name parts of the Linear / Conv1D modules of `model` (what target_modules names)."""
    return sorted({name.split(".")[-1] for name, mod in model.named_modules() if _adaptable(mod)})


def resolve_target_modules(cfg: ExperimentConfig, base: nn.Module) -> list[str] | str:
    """What to pass as PEFT's `target_modules` for `base`: a list of names, or "all-linear".
    ValueError listing the model's linear modules when "attention" is asked of an unknown
    architecture or a named module is missing."""
    targets = tuple(cfg.target_modules)
    family = getattr(base.config, "model_type", None)
    if targets == ("all-linear",):
        return "all-linear"
    if targets == ("attention",):
        if family not in ATTENTION_MODULES:
            raise ValueError(
                f"target_modules='attention': no default for architecture {family!r} (known: "
                f"{', '.join(sorted(ATTENTION_MODULES))}). Name the modules, e.g. --set "
                f"target_modules=...; this model's linear modules: {', '.join(linear_module_names(base))}")
        targets = ATTENTION_MODULES[family]
    missing = [t for t in targets if not _matches(base, t)]
    if missing:
        raise ValueError(f"target_modules={list(cfg.target_modules)!r}: {', '.join(missing)} is not a "
                         f"Linear or Conv1D module of this {family} model; its linear modules: "
                         f"{', '.join(linear_module_names(base))}")
    return list(targets)


def _matches(base: nn.Module, target: str) -> bool:
    return any(_adaptable(m) and (n == target or n.endswith("." + target)) for n, m in base.named_modules())


def targeted_modules(base: nn.Module, targets: list[str] | str) -> list[nn.Module]:
    """The modules of `base` PEFT will adapt for `targets` (PEFT's suffix match; "all-linear":
    every Linear / Conv1D except the output embedding)."""
    out_layer = base.get_output_embeddings()
    if targets == "all-linear":
        return [m for _, m in base.named_modules() if _adaptable(m) and m is not out_layer]
    return [m for n, m in base.named_modules()
            if _adaptable(m) and any(n == t or n.endswith("." + t) for t in targets)]


def fan_in_fan_out(base: nn.Module, targets: list[str] | str) -> bool:
    """PEFT's `fan_in_fan_out`: True for Conv1D (weight [in, out], GPT-2), False for Linear.
    ValueError if the targets mix the two (one LoraConfig cannot describe both)."""
    from transformers.pytorch_utils import Conv1D

    kinds = {isinstance(m, Conv1D) for m in targeted_modules(base, targets)}
    if len(kinds) > 1:
        raise ValueError(f"target_modules={targets!r} mixes Conv1D and Linear modules; name "
                         "modules of one kind")
    return kinds == {True}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant: the frozen embeddings need no grad,
    and the LoRA dropout masks are replayed, so gradients equal those without it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


def build_tiny_model(cfg: ExperimentConfig, vocab_size: int) -> nn.Module:
    """The tiny random model of `cfg`, seeded with `cfg.base_seed` without touching the global RNG."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.base_seed)
        return AutoModelForCausalLM.from_config(tiny_model_config(cfg, vocab_size))
