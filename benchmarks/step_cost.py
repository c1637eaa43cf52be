"""Per-step cost of the regularizers, relative to a plain LoRA step, in one run.

    python benchmarks/step_cost.py [--model ../shared/models/tiny-imdb-base] [--steps 20]

Times, on the same batch and model: a CE-only step; CE + ordering + DC as `train_stage` does it
(LoRA factors collected and the Stage-1 vector flattened once); the same terms with the
factors re-collected from the model and the Stage-1 vector re-flattened every step; a
CE step with DyLoRA's sampled rank (mask hook, snapshot and restore of the weights outside the
update set); a CE step with Matryoshka weighting (the same mask hook holding fixed weights);
CE plus each continual-learning term as `continual.regularizer_terms` sets it up (DC per
module / on delta W, L2 on delta W, EWC, O-LoRA); and a CE step with the non-finite loss guard
of `train_stage` (record every step, check every step as on CPU).
"""
import argparse
import dataclasses
import statistics
import time

import torch

from hybrid_lora import ExperimentConfig, build_model
from hybrid_lora.adapters import flatten_factors, lora_factors, snapshot_factors
from hybrid_lora.continual import StageReference, regularizer_terms
from hybrid_lora.losses import causal_lm_sums, domain_correlation_loss, ordering_penalty
from hybrid_lora.methods import get_method
from hybrid_lora.nested import nested_training
from hybrid_lora.train import FiniteGuard


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/tiny-imdb-base")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    cfg = dataclasses.replace(ExperimentConfig.smoke(), model_name=args.model, r=args.r,
                              rank_schedule=(args.r,) * 3, max_length=128, lora_dropout=0.0)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(1, len(tok), (cfg.batch_size, cfg.max_length))
    stage1 = snapshot_factors(model)
    factors = [(a, b) for _, a, b, _ in lora_factors(model)]
    w_prev = flatten_factors(stage1, args.r)

    def step(extra, nest=None, guard=None) -> None:
        if nest is not None:
            nest.begin(nest.next_rank())
        logits = model(input_ids=ids).logits
        ce, n, _ = causal_lm_sums(logits, ids, with_hits=False)
        loss = ce / n + extra()
        if guard is not None:
            guard.record(0, loss, {"ce": ce / n})
            guard.check()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if nest is not None:
            nest.end()

    def hoisted():
        return 1e-4 * ordering_penalty(factors) + domain_correlation_loss(w_prev, flatten_factors(factors), 0.1)

    def per_step():
        facs = [(a, b) for _, a, b, _ in lora_factors(model)]
        return 1e-4 * ordering_penalty(facs) + domain_correlation_loss(
            flatten_factors(stage1, args.r), flatten_factors(facs), 0.1)

    variants = {"CE only": lambda: 0.0, "CE+order+DC (hoisted)": hoisted, "CE+order+DC (per step)": per_step}
    ref = StageReference(factors=stage1, scalings=[s for *_, s in lora_factors(model)],
                         fisher=[torch.rand_like(t) for ab in stage1 for t in ab],
                         old_a=[a for a, _ in stage1])
    for label, method, change in (("DC per module", "dc", {"dc_variant": "per_module"}),
                                  ("DC on delta W", "dc", {"dc_variant": "delta_w"}),
                                  ("L2 on delta W", "l2", {}), ("EWC", "ewc", {}), ("O-LoRA", "olora", {})):
        terms = regularizer_terms(dataclasses.replace(cfg, **change), get_method(method), 2, factors,
                                  args.r, ref, [s for *_, s in lora_factors(model)])
        variants[f"CE+{label}"] = next(iter(terms.values()))
    times = {k: [] for k in [*variants, "CE, DyLoRA sampled rank", "CE, Matryoshka weighting",
                             "CE + finite guard"]}
    guard = FiniteGuard(torch.device("cpu"), 1, 1)

    def timed_nested(mode: str = "dylora") -> float:
        with nested_training(model, cfg, mode) as nest:  # hooks set up outside the timed step
            t = time.perf_counter()
            step(lambda: 0.0, nest)
            return time.perf_counter() - t

    for _ in range(2):
        for f in variants.values():
            step(f)  # warm-up
        timed_nested()
        timed_nested("matryoshka")
    for _ in range(args.steps):  # interleaved, so drift in machine load hits all variants alike
        for k, f in variants.items():
            t = time.perf_counter()
            step(f)
            times[k].append(time.perf_counter() - t)
        times["CE, DyLoRA sampled rank"].append(timed_nested())
        times["CE, Matryoshka weighting"].append(timed_nested("matryoshka"))
        t = time.perf_counter()
        step(lambda: 0.0, guard=guard)
        times["CE + finite guard"].append(time.perf_counter() - t)
    base = statistics.median(times["CE only"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:<26} median {med * 1e3:8.1f} ms/step   ratio to CE only {med / base:6.3f}")


if __name__ == "__main__":
    main()
