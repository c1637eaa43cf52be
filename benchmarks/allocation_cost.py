"""Per-step cost of budgeted allocation, relative to a plain LoRA step, in one run.

    python benchmarks/allocation_cost.py [--model ../shared/models/tiny-imdb-base] [--steps 20]

The allocation study's setting (preset dynamic: LoRA on every linear layer, r = 16, budget of
uniform rank 8), one batch of 8 x 128 tokens, no dropout. Times, interleaved so that drift in
machine load hits all alike:
- "LoRA": a CE step of plain LoRA;
- "dynamic": the same step with the allocator as `train_stage` runs it (input-variance hooks,
  weight snapshot, the three estimators' averages updated from the gradients, masked weights
  put back), re-masking every step (alloc_delta_t = 1, the worst case; the study re-masks every 5);
- "dynamic, no re-mask": the same allocator past its final allocation;
- "AdaLoRA": PEFT's AdaLoRA model (SVD form, its orthogonality penalty as the loop adds it,
  `update_and_allocate` after the step) while its budget falls (masking every step).
"""
import argparse
import dataclasses
import statistics
import time

import torch

from hybrid_lora import ExperimentConfig, build_model
from hybrid_lora.allocation.adalora import AdaLoraStep
from hybrid_lora.adapters import lora_factors
from hybrid_lora.allocation import Allocator
from hybrid_lora.losses import causal_lm_sums, orthogonality_penalty


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/tiny-imdb-base")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    base = ExperimentConfig.dynamic()
    cfg = dataclasses.replace(ExperimentConfig.smoke(), model_name=args.model, target_modules=("all-linear",),
                              r=base.r, lora_alpha=base.lora_alpha, rank_schedule=(8, 8, 8), max_length=128,
                              lora_dropout=0.0, alloc_delta_t=1, alloc_tinit=0.0, alloc_tfinal=0.0)
    models = {}
    for name in ("LoRA", "dynamic", "dynamic, no re-mask", "AdaLoRA"):
        torch.manual_seed(0)
        models[name] = build_model(cfg, adalora=name == "AdaLoRA")[0].train()
    tok_n = models["LoRA"].config.vocab_size
    ids = torch.randint(1, tok_n, (cfg.batch_size, cfg.max_length), generator=torch.Generator().manual_seed(0))
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for k, m in models.items()}
    total = 10 ** 6  # the budget keeps falling through the timed steps
    helpers = {"dynamic": Allocator(models["dynamic"], cfg, total),
               "dynamic, no re-mask": Allocator(models["dynamic, no re-mask"], cfg, total),
               "AdaLoRA": AdaLoraStep(models["AdaLoRA"], cfg, total)}
    helpers["dynamic, no re-mask"].t = total  # past the final allocation: never re-masks
    ada_factors = [(a, b) for _, a, b, _ in lora_factors(models["AdaLoRA"])]

    def step(name: str) -> float:
        model, opt, helper = models[name], opts[name], helpers.get(name)
        t = time.perf_counter()
        if helper is not None:
            helper.before_step()
        opt.zero_grad(set_to_none=True)
        ce, n, _ = causal_lm_sums(model(input_ids=ids).logits, ids, with_hits=False)
        loss = ce / n
        if name == "AdaLoRA":
            loss = loss + cfg.orth_reg_weight * orthogonality_penalty(ada_factors)
        loss.backward()
        if helper is not None:
            helper.observe()
        opt.step()
        if helper is not None:
            helper.after_step()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up
        for name in models:
            step(name)
    times = {name: [] for name in models}
    for _ in range(args.steps):
        for name in models:
            times[name].append(step(name))
    ref = statistics.median(times["LoRA"])
    for name, v in times.items():
        med = statistics.median(v)
        print(f"{name:<22} median {med * 1e3:8.1f} ms/step   ratio to LoRA {med / ref:6.3f}")


if __name__ == "__main__":
    main()
