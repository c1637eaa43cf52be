"""What a stage t >= 2 is trained against: the adapters saved after earlier stages.

Everything here is rebuilt from the run folder's `adapter_stage<k>` files at the start of a
stage, so a fresh run and one resumed mid-stage set up the same references.

- `StageReference`: the previous adapter's factors (DC, L2, cosine), the EWC anchor and
  diagonal Fisher, and the earlier adapters' A matrices (O-LoRA).
- `regularizer_terms`: the method's lambda-weighted terms as closures of the live factors.
- `stage_model`: the model a stage starts from under freeze-and-add ("add") or "reset".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import (_quiet_peft, attach_lora, build_base_model, build_model, flatten_factors,
                       load_adapter, load_tokenizer, lora_factors, rng_isolated, snapshot_factors)
from .config import ExperimentConfig
from .losses import (causal_lm_sums, dc_delta_w, dc_per_module, delta_w_l2, domain_correlation_loss, ewc_penalty,
                     module_vectors, olora_penalty)
from .methods import Method


def adapter_dir(run: Path, stage: int, n_stages: int) -> Path:
    """Where the adapter after `stage` is saved: adapter_stage<k>, the last one adapter_final."""
    return Path(run) / ("adapter_final" if stage == n_stages else f"adapter_stage{stage}")


@dataclass
class StageReference:
    factors: list | None = None   # [(A, B)] after the previous stage, detached
    scalings: list | None = None  # their PEFT scalings (alpha / r)
    fisher: list | None = None    # EWC: diagonal Fisher per LoRA tensor [A1, B1, A2, ...]
    old_a: list | None = None     # O-LoRA: per module, the earlier adapters' A rows stacked [sum r, in]


def fisher_diagonal(model, dataset, n: int) -> list[torch.Tensor]:
    """The empirical Fisher diagonal: mean over the first `n` sequences of `dataset` of g * g,
    g the gradient of the sequence's mean token cross-entropy (at the training labels, not at
    labels sampled from the model) w.r.t. each LoRA tensor (order A1, B1, A2, B2, ...). Eval mode
    (no dropout), fp32 even in a mixed-precision run (squared fp16 per-sequence gradients
    underflow); one sequence per backward pass, so each g is a per-sequence gradient."""
    params = [t for _, a, b, _ in lora_factors(model) for t in (a, b)]
    fisher = [torch.zeros_like(p) for p in params]
    device = params[0].device
    n = min(n, len(dataset))
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        for j in range(n):
            input_ids, mask, labels = (t[None].to(device) for t in dataset[j])
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            ce, tokens, _ = causal_lm_sums(logits, labels, with_hits=False)
            grads = torch.autograd.grad(ce / tokens.clamp(min=1), params)
            for f, g in zip(fisher, grads):
                f += g.float().square()
    model.train(was_training)
    return [f / max(n, 1) for f in fisher]


def stage_reference(cfg: ExperimentConfig, method: Method, run: Path, stage: int, train_sets,
                    device) -> StageReference | None:
    """The references stage `stage` needs, loaded from the run's saved adapters (None in Stage 1)."""
    if stage == 1:
        return None
    n = len(cfg.domains)
    return reference_from(method, lambda k, trainable=False: load_adapter(cfg, adapter_dir(run, k, n), device,
                                                                          trainable=trainable),
                          stage - 1, train_sets, cfg.ewc_samples)


def reference_from(method: Method, adapter, stages_before: int, train_sets, ewc_samples: int) -> StageReference:
    """The references of the stage after `stages_before` stages: `adapter(k, trainable)` is the
    model after stage k (1..stages_before; the last one is the previous adapter), loaded only when
    the method needs it; `train_sets[k - 1]` stage k's training sequences (EWC's Fisher)."""
    prev_model = adapter(stages_before)
    ref = StageReference(factors=snapshot_factors(prev_model),
                         scalings=[s for *_, s in lora_factors(prev_model)])
    if method.penalty == "ewc":  # online EWC: the Fisher of every earlier domain at its own adapter
        ref.fisher = None
        for k in range(1, stages_before + 1):
            model_k = prev_model if k == stages_before else adapter(k, trainable=True)
            was = {id(p): p.requires_grad for p in model_k.parameters()}
            model_k.requires_grad_(False)
            for _, a, b, _ in lora_factors(model_k):
                a.requires_grad_(True), b.requires_grad_(True)
            f_k = fisher_diagonal(model_k, train_sets[k - 1], ewc_samples)
            for p in model_k.parameters():  # a model the caller trains on stays as it was
                p.requires_grad_(was[id(p)])
            ref.fisher = f_k if ref.fisher is None else [f + g for f, g in zip(ref.fisher, f_k)]
    if method.penalty == "olora":
        per_stage = [[a for a, _ in snapshot_factors(adapter(k))] for k in range(1, stages_before + 1)]
        ref.old_a = [torch.cat(rows, dim=0) for rows in zip(*per_stage)]
    return ref


def regularizer_terms(cfg: ExperimentConfig, method: Method, stage: int, factors, rank: int,
                      ref: StageReference | None, scalings=None) -> dict:
    """{"dc": f, "penalty": f} for the terms on in `stage`, each f() the lambda-weighted value
    at the live `factors` ([(A, B)], PEFT scalings `scalings`, needed by l2). Set up once per
    (re)build: frozen vectors cut to `rank` here, not per step."""
    terms = {}
    _, lam_dc = method.lambdas(cfg, stage)
    if lam_dc:
        prev = ref.factors
        if cfg.dc_variant == "global":  # live vector: the gradient reaches the LoRA weights (defect 1)
            w_prev = flatten_factors(prev, rank)
            terms["dc"] = lambda: domain_correlation_loss(w_prev, flatten_factors(factors), lam_dc)
        elif cfg.dc_variant == "per_module":
            vecs = module_vectors([(a[:rank], b[:, :rank]) for a, b in prev])
            terms["dc"] = lambda: dc_per_module(factors, vecs, lam_dc)
        else:
            terms["dc"] = lambda: dc_delta_w(factors, prev, lam_dc)  # B A of any rank
    lam = method.penalty_lambda(cfg, stage)
    if lam and method.penalty == "l2":
        if scalings is None:
            raise ValueError("the l2 penalty needs the live adapter's scalings")
        prev, prev_scalings = ref.factors, ref.scalings
        terms["penalty"] = lambda: lam * delta_w_l2(factors, prev, scalings, prev_scalings)
    elif lam and method.penalty == "ewc":
        anchors = [t for ab in ref.factors for t in ab]
        if [t.shape for t in anchors] != [t.shape for ab in factors for t in ab]:
            raise ValueError("EWC needs the same LoRA rank as the previous stage's adapter")
        terms["penalty"] = lambda: lam * sum(ewc_penalty(t, t0, f) for t, t0, f in
                                             zip((t for ab in factors for t in ab), anchors, ref.fisher))
    elif lam and method.penalty == "olora":
        old_a = ref.old_a
        terms["penalty"] = lambda: lam * olora_penalty([a for a, _ in factors], old_a)
    return terms


def stage_model(cfg: ExperimentConfig, method: Method, run: Path, stage: int, device, init_seed: int):
    """The model stage `stage` >= 2 starts from when `method.adapter` is "add" (the base with
    the adapters of stages 1..stage-1 merged in, plus a new LoRA) or "reset" (the base plus a
    new LoRA). The new LoRA's A is drawn from a stream seeded with `init_seed`; the global RNG
    is left as it was, so the stage's dropout masks are those of a continued adapter."""
    with rng_isolated(init_seed):
        return _stage_model(cfg, method, run, stage, device)


def _stage_model(cfg: ExperimentConfig, method: Method, run: Path, stage: int, device):
    if method.adapter == "reset":
        return build_model(cfg, device, r=method.train_rank(cfg))[0]
    tok = load_tokenizer(cfg)
    base = build_base_model(cfg, vocab_size=len(tok)).to(device)
    for k in range(1, stage):
        from peft import PeftModel
        with _quiet_peft():
            base = PeftModel.from_pretrained(base, str(adapter_dir(run, k, len(cfg.domains))))
        base = base.merge_and_unload()  # W <- W + s B A, then a plain module again
    base.requires_grad_(False)
    return attach_lora(cfg, base, r=method.train_rank(cfg)).to(device)
