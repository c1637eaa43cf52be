"""Our loss terms inside a `transformers.Trainer` or TRL `SFTTrainer`: no second training loop.

`LossTerms(cfg, method, model, reference)` holds a method's lambda-weighted terms (the ordering
term, DC in its `dc_variant`, L2 on delta W, EWC, O-LoRA: the method table's row, the lambdas of
`cfg`) as closures of the live PEFT model's LoRA factors, built by the same code our loop uses
(`continual.regularizer_terms`); `reference_after(cfg, method, models, datasets)` builds what a
later stage is regularized against (the previous adapter, EWC's Fisher, earlier A matrices) as
`continual.stage_reference` does from a run folder. `regularized(TrainerClass)` adds them to the
trainer's loss:

    Trainer = regularized(transformers.Trainer)          # or regularized(trl.SFTTrainer)
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      loss_terms=LossTerms(cfg, "dc", peft_model, reference_after(cfg, "dc", [stage1])))

Each term is added once per optimizer step (split over gradient-accumulation micro-batches) and
logged through the trainer's own `log` as the mean since the last log (`dc`, `penalty`, `order`).
"""
from __future__ import annotations

import torch

from .adapters import current_rank, lora_factors
from .config import ExperimentConfig
from .continual import StageReference, reference_from, regularizer_terms
from .losses import ordering_penalty
from .methods import get_method


class LossTerms:
    """The lambda-weighted terms of `method` in `stage` (default 2: DC and the penalties act
    after Stage 1) at the live factors of `model`; calling it returns {name: scalar tensor}."""

    def __init__(self, cfg: ExperimentConfig, method: str, model, reference: StageReference | None = None,
                 stage: int = 2):
        m = get_method(method)
        factors = [(a, b) for _, a, b, _ in lora_factors(model)]
        scalings = [s for *_, s in lora_factors(model)]
        needs = bool(m.lambdas(cfg, stage)[1] or m.penalty_lambda(cfg, stage))
        if needs and reference is None:
            raise ValueError(f"method {method!r} regularizes stage {stage} against the previous adapter: "
                             "give reference=reference_after(cfg, method, [previous model], ...)")
        self.terms = regularizer_terms(cfg, m, stage, factors, current_rank(model), reference, scalings)
        lam_order = m.lambdas(cfg, stage)[0]
        if lam_order:
            self.terms = {"order": lambda: lam_order * ordering_penalty(factors), **self.terms}

    def __call__(self) -> dict[str, torch.Tensor]:
        return {name: term() for name, term in self.terms.items()}


def reference_after(cfg: ExperimentConfig, method: str, models: list, datasets: list | None = None) -> StageReference:
    """What the stage after `models` (the PEFT models after stages 1, 2, ...; the last is the
    previous adapter) is regularized against. EWC needs `datasets`: each earlier stage's
    training sequences as `data.tokenize` gives them (cfg.ewc_samples of them are used). What is
    kept are copies (of the LoRA factors, the Fisher), so training the last model on does not
    move the reference, and no model is copied whole."""
    m = get_method(method)
    if m.penalty == "ewc" and not datasets:
        raise ValueError("EWC's Fisher needs each earlier stage's training sequences: "
                         "datasets=[tokenize(texts, tokenizer, max_length), ...]")
    return reference_from(m, lambda k, trainable=False: models[k - 1], len(models), datasets or [],
                          cfg.ewc_samples)


class RegularizedMixin:
    """Put before a Trainer class: `compute_loss` adds `loss_terms()` to the trainer's loss in
    training, and `log` adds each term's mean since the last log."""

    def __init__(self, *args, loss_terms: LossTerms | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_terms = loss_terms
        self._term_sums, self._term_count = {}, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.loss_terms is not None and model.training:
            terms = self.loss_terms()
            # the trainer divides an unscaled loss by the accumulation steps itself
            share = 1.0 / self.current_gradient_accumulation_steps if self._loss_scaled_for_ga(num_items_in_batch) else 1.0
            for name, value in terms.items():
                loss = loss + share * value
                self._term_sums[name] = self._term_sums.get(name, 0.0) + share * float(value.detach())
            self._term_count += share
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the trainer's loss is already the micro-batch's share of the step (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return scaled
        return bool(getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
            or getattr(self, "compute_loss_func", None) is not None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            logs = {**logs, **{name: total / self._term_count for name, total in self._term_sums.items()}}
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)


def regularized(trainer_cls: type) -> type:
    """`trainer_cls` (transformers.Trainer, trl.SFTTrainer, a subclass) taking `loss_terms=`."""
    return type(f"Regularized{trainer_cls.__name__}", (RegularizedMixin, trainer_cls), {})
