"""Where a run's wall time goes, and the issue-12 targets, measured in one run on CPU.

    python benchmarks/pipeline.py [--model ../shared/models/tiny-imdb-base] [--n-train 300]
                                  [--method hybrid] [--out /tmp/pipeline_bench] [--set FIELD=VALUE ...]

One run of `--method` through `run_experiment` (the path users take) on the small base, IMDb ->
Yelp from ../shared/data, in the paper's proportions: n_eval = n_train / 3, 3 + 3 epochs,
r = 64 with the 64 -> 32 -> 16 schedule, and the paper's rank sweep (ranks 1..64, slice and
SVD, of the Stage-1 and final adapters on both domains). Package functions are wrapped with
timers (time inside a wrapped call that another wrapped call spends is counted once, in the
inner one), and the split is printed: training steps, per-epoch evaluation, R-matrix
evaluations, rank sweep, checkpoints and adapter saves, data preparation, model builds,
rank changes, continual-learning references, and the rest.

Then the targets, each a ratio measured here in one process:
  training steps / wall time of the run                       (target >= 0.85)
  evaluation throughput / a bare forward loop, same batches   (target >= 0.95)
  rank change: in place vs a fresh base + LoRA, same outputs  (no reload of the base)
  CE + ordering + DC step / CE-only step                      (target <= 1.03)
"""
import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import hybrid_lora.runs as runs
import hybrid_lora.train as train
from hybrid_lora import ExperimentConfig, build_model, evaluate_loss_and_token_acc, run_experiment
from hybrid_lora.adapters import build_base_model, flatten_factors, lora_factors, snapshot_factors
from hybrid_lora.data import make_loaders
from hybrid_lora.losses import causal_lm_sums, domain_correlation_loss, ordering_penalty

SHARED = Path(__file__).resolve().parents[2] / "shared"
# (module, function name) -> phase; calls resolved through these module attributes are timed
PHASES = {
    (train, "evaluate_loss_and_token_acc"): "per-epoch evaluation",
    (train, "rebuild_model_for_new_rank"): "rank changes (schedule)",
    (runs, "evaluate_loss_and_token_acc"): "R-matrix evaluations",
    (runs, "sweep_run"): "rank sweep",
    (runs, "save_checkpoint"): "checkpoints + adapter saves",
    (runs, "save_adapter"): "checkpoints + adapter saves",
    (runs, "clear_checkpoints"): "checkpoints + adapter saves",
    (runs, "load_tokenizer"): "data preparation",
    (runs, "make_loaders"): "data preparation",
    (runs, "build_model"): "model builds",
    (runs, "load_adapter"): "model builds",
    (runs, "stage_model"): "model builds",
    (runs, "stage_reference"): "continual-learning references",
    (runs, "train_stage"): "training steps",
}


class PhaseTimer:
    """Exclusive wall time per phase: a wrapped call's time minus that of wrapped calls inside it."""

    def __init__(self):
        self.seconds, self.stack = defaultdict(float), []

    def wrap(self, fn, phase):
        def timed(*args, **kwargs):
            self.stack.append(0.0)  # time spent in wrapped calls made by this one
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                inner = self.stack.pop()
                self.seconds[phase] += total - inner
                if self.stack:
                    self.stack[-1] += total
        return timed

    def install(self):
        for (module, name), phase in PHASES.items():
            setattr(module, name, self.wrap(getattr(module, name), phase))


def run_split(cfg, method, out) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    timer = PhaseTimer()
    originals = {(m, n): getattr(m, n) for m, n in PHASES}
    timer.install()
    try:
        start = time.perf_counter()
        run_experiment(cfg, method, seed=42, out_dir=out, progress=False)
        wall = time.perf_counter() - start
    finally:
        for (m, n), fn in originals.items():
            setattr(m, n, fn)
    return dict(timer.seconds), wall


def eval_vs_bare(cfg, repeats: int) -> tuple[float, float]:
    """(seconds of evaluate_loss_and_token_acc per pass, of a bare no-grad forward loop), medians."""
    model, tok = build_model(cfg)
    loader = make_loaders(cfg, tok, cfg.domains[0], seed=42).eval
    model.eval()

    def bare():
        with torch.no_grad():
            for ids, mask, _ in loader:
                model(input_ids=ids, attention_mask=mask).logits

    times = {"eval": [], "eval per sequence": [], "bare": []}
    for i in range(repeats + 1):  # interleaved; the first round warms up
        for name, fn in (("bare", bare), ("eval", lambda: evaluate_loss_and_token_acc(model, loader)),
                         ("eval per sequence",
                          lambda: evaluate_loss_and_token_acc(model, loader, per_sequence=True))):
            t = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def rank_change(cfg) -> tuple[float, float, bool]:
    """(seconds of rebuild_model_for_new_rank r -> r/2, of a fresh base + LoRA at r/2, equal logits)."""
    from peft import get_peft_model

    from hybrid_lora.adapters import _quiet_peft, lora_config

    model, tok = build_model(cfg)
    with torch.no_grad():
        for _, a, b, _ in lora_factors(model):
            b.normal_(0, 0.02)
    k = cfg.r // 2
    ids = torch.randint(1, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    base = build_base_model(cfg, vocab_size=len(tok))
    with _quiet_peft():
        try:
            fresh = get_peft_model(base, lora_config(cfg, base, r=k, lora_alpha=cfg.lora_alpha * k / cfg.r))
        except TypeError:  # before issue 12: lora_config(cfg, r, lora_alpha)
            fresh = get_peft_model(base, lora_config(cfg, r=k, lora_alpha=cfg.lora_alpha * k / cfg.r))
    with torch.no_grad():
        for (_, a, b, _), (_, a2, b2, _) in zip(lora_factors(model), lora_factors(fresh)):
            a2.copy_(a[:k]), b2.copy_(b[:, :k])
    t_fresh = time.perf_counter() - t
    t = time.perf_counter()
    cut = train.rebuild_model_for_new_rank(model, k, cfg)
    t_cut = time.perf_counter() - t
    cut.eval(), fresh.eval()
    with torch.no_grad():
        same = torch.equal(cut(input_ids=ids).logits, fresh(input_ids=ids).logits)
    return t_cut, t_fresh, same


def step_ratio(cfg, steps: int) -> float:
    """Median CE + ordering + DC step / median CE-only step, as train_stage sets the terms up."""
    model, tok = build_model(dataclasses.replace(cfg, lora_dropout=0.0))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    batch = next(iter(make_loaders(cfg, tok, cfg.domains[0], seed=42).train))
    factors = [(a, b) for _, a, b, _ in lora_factors(model)]
    w_prev = flatten_factors(snapshot_factors(model), cfg.r)

    def step(extra):
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
        ce, n, _ = causal_lm_sums(logits, batch[2], with_hits=False)
        loss = ce / n + extra()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def terms():
        return cfg.lambda_order * ordering_penalty(factors) + \
            domain_correlation_loss(w_prev, flatten_factors(factors), cfg.lambda_dc)

    times = {"ce": [], "all": []}
    for i in range(steps + 2):
        for name, extra in (("ce", lambda: 0.0), ("all", terms)):
            t = time.perf_counter()
            step(extra)
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    return statistics.median(times["all"]) / statistics.median(times["ce"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "tiny-imdb-base"))
    p.add_argument("--data-dir", default=str(SHARED / "data"))
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--method", default="hybrid")
    p.add_argument("--out", default="/tmp/pipeline_bench")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    args = p.parse_args()
    cfg = dataclasses.replace(ExperimentConfig.paper(), model_name=args.model, data_source="local",
                              data_dir=args.data_dir, n_train=args.n_train, n_eval=args.n_train // 3,
                              seeds=(42,), device="cpu", methods=(args.method,))
    cfg = cfg.with_overrides(dict(s.split("=", 1) for s in args.set))
    torch.set_num_threads(torch.get_num_threads())
    print(f"{args.method}, {cfg.n_train} train / {cfg.n_eval} eval sequences of {cfg.max_length} tokens, "
          f"epochs {cfg.epochs_stage1} + {cfg.epochs_stage2}, r={cfg.r}, schedule {cfg.rank_schedule}, "
          f"sweep ranks {cfg.sweep_ranks} x {cfg.sweep_kinds}; torch threads {torch.get_num_threads()}")
    seconds, wall = run_split(cfg, args.method, Path(args.out))
    rest = wall - sum(seconds.values())
    print(f"\nwall time of the run: {wall:.1f} s")
    for phase, s in sorted(seconds.items(), key=lambda kv: -kv[1]) + [("other", rest)]:
        print(f"  {phase:<32} {s:8.1f} s  {s / wall:6.1%}")
    ev = eval_vs_bare(cfg, args.repeats)
    t_cut, t_fresh, same = rank_change(cfg)
    ratio = step_ratio(cfg, steps=10 * args.repeats)
    train_share = seconds.get("training steps", 0.0) / wall
    print("\ntargets")
    print(f"  training steps / wall time            {train_share:6.3f}  (target >= 0.85)")
    print(f"  eval throughput / bare forward loop   {ev['bare'] / ev['eval']:6.3f}  (target >= 0.95); "
          f"with per-sequence sums {ev['bare'] / ev['eval per sequence']:.3f}")
    print(f"  rank change in place / fresh rebuild  {t_cut / t_fresh:6.3f}  ({t_cut * 1e3:.1f} ms vs "
          f"{t_fresh * 1e3:.1f} ms; identical outputs: {same})")
    print(f"  CE + order + DC step / CE-only step   {ratio:6.3f}  (target <= 1.03)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
