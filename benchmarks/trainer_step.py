"""Our loop's training step against transformers' Trainer with our terms, in one run.

    python benchmarks/trainer_step.py [--model ../shared/models/tiny-imdb-base] [--steps 30] [--repeats 3]

Stage 2 of `dc` (CE + the paper's DC against a Stage-1 adapter) on the same model, the same
batches in the same order and the same term, fp32 on the CPU, LoRA r = 16 on the attention
projections, batch 8 x 128 tokens, no dropout: `train.train_stage` (our loop) against
`regularized(transformers.Trainer)` (constant learning rate, no clipping, logging every
`--steps` steps). Each optimizer step is timed from its start to the next one's (our loop: around
`_StageLoop.step`; Trainer: `on_step_begin` to `on_step_end` callbacks), the first 3 steps of each
repeat left out; the two alternate, `--repeats` times. The bare step (forward, backward,
AdamW step on the same batch, no framework) is timed too, so each framework's own cost shows.
Run it alone on the machine.
"""
import argparse
import copy
import dataclasses
import statistics
import time

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from hybrid_lora import ExperimentConfig, build_model
from hybrid_lora.adapters import lora_factors
from hybrid_lora.data import EpochSampler, make_loaders, train_loader
from hybrid_lora.hf_trainer import LossTerms, reference_after, regularized
from hybrid_lora.losses import causal_lm_sums, domain_correlation_loss
from hybrid_lora.adapters import flatten_factors
from hybrid_lora.methods import get_method
from hybrid_lora import train as our_train

WARMUP = 3


class Rows:
    def __init__(self, tensors, order):
        self.tensors, self.order = tensors, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return dict(zip(("input_ids", "attention_mask", "labels"), self.tensors[self.order[i]]))


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


def ours(cfg, model, dataset, reference) -> list[float]:
    """Per-step seconds of one epoch of our `train_stage` (Stage 2 of `dc`)."""
    times, step = [], our_train._StageLoop.step

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = step(self, *args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    our_train._StageLoop.step = timed
    try:
        our_train.train_stage(model, cfg, get_method("dc"), 2, train_loader(cfg, dataset, 42), None, (cfg.r,),
                              reference=reference, progress=False, evaluate_last=False)
    finally:
        our_train._StageLoop.step = step
    return times


def trainer(cfg, model, dataset, stage1, out) -> list[float]:
    """Per-step seconds of the same epoch through `regularized(Trainer)`."""
    sampler = EpochSampler(len(dataset), 42)
    sampler.set_epoch(2, 1)

    class InOrder(regularized(Trainer)):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    clock = StepTimes()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                             learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="constant",
                             max_grad_norm=0.0, logging_steps=len(dataset), report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    terms = LossTerms(cfg, "dc", model, reference_after(cfg, "dc", [stage1]))
    InOrder(model=model, args=args, train_dataset=Rows(dataset, list(sampler)), loss_terms=terms,
            callbacks=[clock]).train()
    return clock.times


def bare(cfg, model, dataset, stage1, steps: int) -> list[float]:
    """Per-step seconds of forward, CE + DC, backward, AdamW step on the batches, no framework."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    factors = [(a, b) for _, a, b, _ in lora_factors(model)]
    w_prev = flatten_factors([(a.detach(), b.detach()) for _, a, b, _ in lora_factors(stage1)])
    times = []
    model.train()
    for i in range(steps):
        ids, mask, labels = dataset[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        t0 = time.perf_counter()
        ce, n, _ = causal_lm_sums(model(input_ids=ids, attention_mask=mask).logits, labels, with_hits=False)
        loss = ce / n + domain_correlation_loss(w_prev, flatten_factors(factors), cfg.lambda_dc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/tiny-imdb-base")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = dataclasses.replace(ExperimentConfig.forgetting("imdb-yelp"), model_name=args.model, data_source="local",
                              data_dir=args.data_dir, lora_dropout=0.0, n_train=args.steps * 8, n_eval=8, n_val=0,
                              batch_size=8, max_length=128, device="cpu", mixed_precision="no")
    torch.set_num_threads(torch.get_num_threads())
    torch.manual_seed(0)
    stage1, tok = build_model(cfg)
    with torch.no_grad():  # a Stage-1 adapter to regularize against (B starts at zero)
        for _, a, b, _ in lora_factors(stage1):
            b.normal_(0, 0.01)
    dataset = make_loaders(cfg, tok, "yelp", 42).train.dataset
    result = {"ours": [], "trainer": [], "bare": []}
    for _ in range(args.repeats):
        result["ours"] += ours(cfg, copy.deepcopy(stage1), dataset,
                               reference_after(cfg, "dc", [stage1]))[WARMUP:]
        result["trainer"] += trainer(cfg, copy.deepcopy(stage1), dataset, stage1, "/tmp/trainer_step")[WARMUP:]
        result["bare"] += bare(cfg, copy.deepcopy(stage1), dataset, stage1, args.steps)[WARMUP:]
    print(f"model {args.model}, LoRA r={cfg.r} on attention, batch {cfg.batch_size} x {cfg.max_length}, fp32 CPU, "
          f"{torch.get_num_threads()} threads, {args.repeats} x {args.steps - WARMUP} steps each")
    base = statistics.median(result["bare"])
    for name, times in result.items():
        med = statistics.median(times)
        print(f"{name:>8}: median {med * 1000:7.1f} ms/step (IQR {statistics.quantiles(times, n=4)[0] * 1000:.1f}-"
              f"{statistics.quantiles(times, n=4)[2] * 1000:.1f}), {med / base:.3f}x the bare step")
    print(f"trainer / ours: {statistics.median(result['trainer']) / statistics.median(result['ours']):.3f}")


if __name__ == "__main__":
    main()
