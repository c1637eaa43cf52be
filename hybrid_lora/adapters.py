"""Base model + PEFT LoRA: building, reading the LoRA factors, flattening, changing rank.

Conventions (PEFT's): in every LoRA module, A = `lora_A.weight` has shape [r, in] and
B = `lora_B.weight` has shape [out, r]; delta W = scaling * B @ A with scaling = alpha / r.
Rank component i is row i of A and column i of B. PEFT's AdaLoRA layers (method `adalora`)
hold A = `lora_A` [r, in] and B = `lora_B` [out, r] as parameters, with delta W = s B diag(E) A,
E = `lora_E` [r, 1] its singular values and s = alpha / r. Modules are always visited in
`model.named_modules()` order (for GPT-2: layer 0, 1, ...), which fixes the layout of
every flattened vector: for each module, A[:k] row-major, then B[:, :k] row-major.
"""
from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

from .config import ExperimentConfig
from .families import fan_in_fan_out, resolve_target_modules
from .models import build_base_model, byte_tokenizer, load_tokenizer  # noqa: F401 - also imported from here


@contextmanager
def _quiet_peft():
    """PEFT calls a transformers method that transformers 5 deprecates: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield

ADAPTER = "default"  # PEFT's adapter name


@contextmanager
def rng_isolated(seed: int | None = None):
    """Inside the block, random numbers (Python, NumPy, torch CPU and CUDA) come from a stream
    of their own (seeded with `seed` if given); afterwards every global RNG is as before.
    Building or loading a model draws random initial weights: wrapped in this, it leaves the
    training stream (LoRA dropout) untouched, so runs stay paired whatever they load."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            if seed is not None:
                random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
            yield
        finally:
            random.setstate(py), np.random.set_state(npy)


# ---------------------------------------------------------------------- building
def lora_config(cfg: ExperimentConfig, base: nn.Module, r: int | None = None,
                lora_alpha: float | None = None) -> LoraConfig:
    """PEFT's LoraConfig for this experiment on `base` (optionally at another rank / alpha):
    `cfg.target_modules` resolved for base's family, `fan_in_fan_out` from the module type."""
    targets = resolve_target_modules(cfg, base)
    return LoraConfig(r=cfg.r if r is None else r,
                      lora_alpha=cfg.lora_alpha if lora_alpha is None else lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out(base, targets))


def adalora_config(cfg: ExperimentConfig, base: nn.Module) -> AdaLoraConfig:
    """PEFT's AdaLoraConfig from rank cfg.r to the budget of uniform rank rank_schedule[-1]
    (`target_r`), with cfg's estimator averages. Its schedule in steps (total_step, tinit,
    tfinal, deltaT) is set for each stage by `adalora.AdaLoraStep`; placeholders here."""
    targets = resolve_target_modules(cfg, base)
    return AdaLoraConfig(init_r=cfg.r, target_r=cfg.rank_schedule[-1], lora_alpha=cfg.lora_alpha,
                         lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM",
                         fan_in_fan_out=fan_in_fan_out(base, targets), beta1=cfg.alloc_beta1,
                         beta2=cfg.alloc_beta2, orth_reg_weight=cfg.orth_reg_weight,
                         total_step=1, tinit=0, tfinal=0, deltaT=cfg.alloc_delta_t)


def attach_lora(cfg: ExperimentConfig, base: nn.Module, r: int | None = None,
                adalora: bool = False) -> nn.Module:
    """`base` with a new rank-`r` (default cfg.r) LoRA (`adalora`: PEFT's AdaLoRA at rank cfg.r);
    only the adapter weights are trainable."""
    with _quiet_peft():
        return get_peft_model(base, adalora_config(cfg, base) if adalora else lora_config(cfg, base, r=r))


def build_model(cfg: ExperimentConfig, device: torch.device | str = "cpu", r: int | None = None,
                adalora: bool = False):
    """(PEFT model with LoRA (rank `r`, default cfg.r; `adalora`: AdaLoRA) attached and only
    the adapter trainable, tokenizer), on `device`."""
    tok = load_tokenizer(cfg)
    return attach_lora(cfg, build_base_model(cfg, vocab_size=len(tok)), r=r, adalora=adalora).to(device), tok


def is_adalora(model: nn.Module) -> bool:
    """Whether `model`'s adapter is PEFT's AdaLoRA."""
    return isinstance(getattr(model, "peft_config", {}).get(ADAPTER), AdaLoraConfig)


@contextmanager
def full_rank(model: nn.Module):
    """Inside the block an AdaLoRA model saves every component (masked ones have E = 0), not
    only those of its `rank_pattern`: checkpoints and stage adapters continue training exactly
    from such a save. Other models are untouched."""
    if not is_adalora(model):
        yield
        return
    config = model.peft_config[ADAPTER]
    pattern, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = pattern


# ----------------------------------------------------------------------- factors
def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(module name, PEFT LoRA layer)] in model order."""
    out = [(name, mod) for name, mod in model.named_modules()
           if isinstance(getattr(mod, "lora_A", None), (nn.ModuleDict, nn.ParameterDict)) and ADAPTER in mod.lora_A]
    if not out:
        raise ValueError("model has no LoRA modules (expected a PEFT LoRA model)")
    return out


def lora_factors(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """[(module name, A [r, in], B [out, r], scaling)] of every LoRA module, live parameters
    (AdaLoRA: its A and B without E, scaling alpha / r)."""
    out = []
    for name, mod in lora_layers(model):
        a, b = mod.lora_A[ADAPTER], mod.lora_B[ADAPTER]
        if isinstance(a, nn.Parameter):  # AdaLoRA: scaling[ADAPTER] is alpha, divided by ranknum
            out.append((name, a, b, mod.scaling[ADAPTER] / float(mod.ranknum[ADAPTER])))
        else:
            out.append((name, a.weight, b.weight, mod.scaling[ADAPTER]))
    return out


@contextmanager
def component_mask(model: nn.Module):
    """Yield m [r] (ones, on the model's device): inside the block every LoRA module computes
    B diag(m) A x instead of B A x. Edit m in place: 0 drops a component, c rescales it
    (e.g. m = r/b on the first b components gives rank b at scaling alpha/b)."""
    layers = lora_layers(model)
    a0 = layers[0][1].lora_A[ADAPTER].weight
    m = torch.ones(a0.shape[0], device=a0.device)
    # the hook scales lora_A's output [..., r]: after dropout and A, before B
    handles = [mod.lora_A[ADAPTER].register_forward_hook(lambda _mod, _inp, out: out * m)
               for _, mod in layers]
    try:
        yield m
    finally:
        for h in handles:
            h.remove()


def snapshot_factors(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Detached copies [(A, B)] of the LoRA factors, on the model's device (e.g. Stage-1 weights)."""
    return [(a.detach().clone(), b.detach().clone()) for _, a, b, _ in lora_factors(model)]


def flatten_factors(factors, rank: int | None = None) -> torch.Tensor:
    """1-D vector of [(A, B), ...]: per module A[:rank] then B[:, :rank], each row-major."""
    parts = []
    for a, b in factors:
        k = a.shape[0] if rank is None else rank
        if k > a.shape[0]:
            raise ValueError(f"rank={k} exceeds the factors' rank {a.shape[0]}")
        parts += [a[:k].reshape(-1), b[:, :k].reshape(-1)]
    return torch.cat(parts)


def flatten_lora_params(model: nn.Module, rank: int | None = None, detach: bool = False) -> torch.Tensor:
    """All LoRA A and B weights as one 1-D vector (layout in the module docstring).

    `rank=k` keeps each module's first k components, so a higher-rank model's vector
    cut to k lines up element by element with a rank-k model's vector. Live (gradients
    flow, same device) unless `detach=True`.
    """
    vec = flatten_factors([(a, b) for _, a, b, _ in lora_factors(model)], rank)
    return vec.detach() if detach else vec


def current_rank(model: nn.Module) -> int:
    """The LoRA rank r of the model's (single, uniform) adapter."""
    ranks = {a.shape[0] for _, a, _, _ in lora_factors(model)}
    if len(ranks) != 1:
        raise ValueError(f"model has LoRA modules of several ranks {sorted(ranks)}")
    return ranks.pop()


def count_trainable_params(model: nn.Module) -> int:
    """Number of parameters with requires_grad, measured from the model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ change rank
def rebuild_model_for_new_rank(model: nn.Module, new_r: int, cfg: ExperimentConfig | None = None,
                               scaling: str = "preserve") -> nn.Module:
    """`model` with its LoRA cut, in place, to rank `new_r`: the first `new_r` components kept.

    scaling="preserve": alpha_new = alpha * new_r / old_r, so alpha/r and every kept
    component's contribution are unchanged. scaling="peft": alpha is kept, so alpha/r
    grows by old_r/new_r (what the original implementation did, for comparison).
    The base model is not reloaded; the LoRA weights become new Parameters, so the caller
    must build a new optimizer. Returns `model` (`cfg` is not needed; kept for callers).
    """
    if scaling not in ("preserve", "peft"):
        raise ValueError(f"scaling={scaling!r}: must be 'preserve' or 'peft'")
    peft_cfg = model.peft_config[ADAPTER]
    old_r = peft_cfg.r
    if not 1 <= new_r <= old_r:
        raise ValueError(f"new_r={new_r}: must be between 1 and the current rank {old_r}")
    alpha = peft_cfg.lora_alpha * new_r / old_r if scaling == "preserve" else peft_cfg.lora_alpha
    for _, mod in lora_layers(model):
        lin_a, lin_b = mod.lora_A[ADAPTER], mod.lora_B[ADAPTER]
        with torch.no_grad():  # new leaves: the optimizer must not hold the old ones
            lin_a.weight = nn.Parameter(lin_a.weight[:new_r].clone(), lin_a.weight.requires_grad)      # [new_r, in]
            lin_b.weight = nn.Parameter(lin_b.weight[:, :new_r].clone(), lin_b.weight.requires_grad)  # [out, new_r]
        lin_a.out_features = lin_b.in_features = new_r
        # what PEFT's update_layer sets for a rank-new_r adapter (no rsLoRA)
        mod.r[ADAPTER], mod.lora_alpha[ADAPTER], mod.scaling[ADAPTER] = new_r, alpha, alpha / new_r
    peft_cfg.r, peft_cfg.lora_alpha = new_r, alpha
    return model


def load_adapter(cfg: ExperimentConfig, path: str | Path, device: torch.device | str = "cpu",
                 trainable: bool = False):
    """A PEFT adapter saved with `save_pretrained`, on a fresh base model built from `cfg`.

    Rank and lora_alpha come from the saved adapter_config.json. Returned in eval mode;
    `trainable=True` leaves its LoRA weights trainable (to continue training). Draws nothing
    from the global RNG (PEFT's random init of the LoRA weights, then overwritten, would).
    """
    tok = load_tokenizer(cfg)
    with rng_isolated(), _quiet_peft():
        model = PeftModel.from_pretrained(build_base_model(cfg, vocab_size=len(tok)), str(path),
                                          is_trainable=trainable)
    for name, p in model.named_parameters():
        if "lora_" in name and not torch.isfinite(p).all():
            raise ValueError(f"adapter {path}: {name} holds non-finite values (NaN or inf); "
                             "it cannot be used")
    return model.to(device).eval()


def base_fingerprint(model: nn.Module) -> str:
    """16 hex digits of SHA-256 over the frozen base weights: names, shapes, and float64 sums of
    the weights and of their magnitudes to 10 digits (so CPU and GPU agree). LoRA weights are
    left out: it tells whether a run continues on the base model it started on."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            name = name.replace("base_model.model.", "").replace(".base_layer", "")
            total, size = p.sum(dtype=torch.float64).item(), p.abs().sum(dtype=torch.float64).item()
            h.update(f"{name}{tuple(p.shape)}{total:.10g}{size:.10g};".encode())
    return h.hexdigest()[:16]
