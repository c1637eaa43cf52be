"""bf16 autocast against fp32 on the CPU, on the real SmolLM2-135M base, measured in one run.

    python benchmarks/cpu_bf16.py [--model ../shared/models/smollm2-135m] [--steps 20]
                                  [--n-train 48] [--out /tmp/cpu_bf16] [--no-split]

1. A training step (batch 8 x 128 tokens, LoRA r = 16 on the attention projections, our loss,
   AdamW): median seconds in fp32 and under bf16 autocast, interleaved, and their ratio.
2. Evaluation throughput (`evaluate_loss_and_token_acc`, 64 IMDb test texts): tokens per second
   in fp32 and bf16, median of 3 passes each, and the ratio.
3. The same `--steps` training steps from the same initial adapter on the same batches, once in
   fp32 and once in bf16: both adapters then evaluated in fp32 on the 64 texts, and the loss
   difference (what bf16 training costs in the result).
4. The wall-time split of one `hybrid` run in the paper's proportions (n_eval = n_train / 3,
   3 + 3 epochs, r = 64 with 64 -> 32 -> 16, the paper's rank sweep) in bf16, as
   benchmarks/pipeline.py splits the small base's (`--no-split` skips it).

Run it alone on the machine: on 2 cores a second job slows both by far more than 2x.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import SHARED, run_split  # noqa: E402

from hybrid_lora import ExperimentConfig, build_model, evaluate_loss_and_token_acc  # noqa: E402
from hybrid_lora.adapters import load_tokenizer, lora_factors  # noqa: E402
from hybrid_lora.data import make_loaders  # noqa: E402
from hybrid_lora.evaluate import autocast  # noqa: E402
from hybrid_lora.losses import causal_lm_sums  # noqa: E402
from hybrid_lora.train import cpu_bf16_native, make_optimizer  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def step(model, opt, batch, amp) -> None:
    """One training step: forward under autocast (or not), mean CE, backward, AdamW."""
    ids, mask, labels = batch
    with autocast(torch.device("cpu"), amp):
        logits = model(input_ids=ids, attention_mask=mask).logits
    ce, n, _ = causal_lm_sums(logits, labels, with_hits=False)
    opt.zero_grad(set_to_none=True)
    (ce / n).backward()
    opt.step()


def step_times(cfg, batches, repeats: int) -> dict:
    """Median seconds of a training step per precision, interleaved after one warm-up round."""
    model, _ = build_model(cfg)
    model.train()
    opt = make_optimizer(model, cfg)
    times = {name: [] for name in PRECISIONS}
    for i in range(repeats + 1):
        for name, amp in PRECISIONS.items():
            t = time.perf_counter()
            step(model, opt, batches[i % len(batches)], amp)
            if i:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def eval_throughput(cfg, loader, repeats: int = 3) -> dict:
    """Tokens per second of evaluate_loss_and_token_acc per precision (median of `repeats`)."""
    model, _ = build_model(cfg)
    model.eval()
    tokens = sum(int(mask.sum()) for _, mask, _ in loader)
    out = {}
    for name, amp in PRECISIONS.items():
        evaluate_loss_and_token_acc(model, loader, amp)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            evaluate_loss_and_token_acc(model, loader, amp)
            times.append(time.perf_counter() - t)
        out[name] = tokens / statistics.median(times)
    return out


def trained_losses(cfg, batches, eval_loader) -> dict:
    """fp32 evaluation loss of the adapter after the same steps trained in each precision, from
    the same initial adapter (B randomised so the start is not the base model)."""
    out = {}
    for name, amp in PRECISIONS.items():
        torch.manual_seed(0)
        model, _ = build_model(dataclasses.replace(cfg, lora_dropout=0.0))
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for _, _, b, _ in lora_factors(model):
                b.copy_(torch.randn(b.shape, generator=g) * 1e-3)
        model.train()
        opt = make_optimizer(model, cfg)
        for batch in batches:
            step(model, opt, batch, amp)
        out[name] = evaluate_loss_and_token_acc(model.eval(), eval_loader)["loss"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m"))
    p.add_argument("--data-dir", default=str(SHARED / "data"))
    p.add_argument("--steps", type=int, default=20, help="training steps of part 3")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per precision in part 1")
    p.add_argument("--n-train", type=int, default=48, help="training texts of the run in part 4")
    p.add_argument("--out", default="/tmp/cpu_bf16")
    p.add_argument("--no-split", action="store_true", help="skip part 4")
    args = p.parse_args()
    cfg = dataclasses.replace(ExperimentConfig.paper(), model_name=args.model, data_source="local",
                              data_dir=args.data_dir, r=16, lora_alpha=32.0, rank_schedule=(16, 16, 16),
                              n_train=8 * args.steps, n_eval=64, lr=1e-3, device="cpu", seeds=(42,))
    print(f"{args.model}: batch {cfg.batch_size} x {cfg.max_length} tokens, LoRA r={cfg.r} on "
          f"{cfg.target_modules}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"CPU computes bf16 natively: {cpu_bf16_native()}")
    loaders = make_loaders(cfg, load_tokenizer(cfg), "imdb", seed=42)
    batches = [b for _, b in zip(range(args.steps), loaders.train)]

    times = step_times(cfg, batches, args.repeats)
    print(f"\n1. training step: fp32 {times['fp32']:.2f} s, bf16 {times['bf16']:.2f} s; "
          f"fp32 / bf16 = {times['fp32'] / times['bf16']:.2f}x")
    tput = eval_throughput(cfg, loaders.eval)
    print(f"2. evaluation: fp32 {tput['fp32']:.0f} tokens/s, bf16 {tput['bf16']:.0f} tokens/s; "
          f"bf16 / fp32 = {tput['bf16'] / tput['fp32']:.2f}x")
    losses = trained_losses(cfg, batches, loaders.eval)
    print(f"3. after {len(batches)} identical steps, fp32 evaluation loss: trained in fp32 {losses['fp32']:.4f}, "
          f"in bf16 {losses['bf16']:.4f}; bf16 - fp32 = {losses['bf16'] - losses['fp32']:+.4f} nats/token")
    if args.no_split:
        return
    run = dataclasses.replace(ExperimentConfig.paper(), model_name=args.model, data_source="local",
                              data_dir=args.data_dir, n_train=args.n_train, n_eval=args.n_train // 3,
                              device="cpu", seeds=(42,), methods=("hybrid",), mixed_precision="bf16")
    seconds, wall = run_split(run, "hybrid", Path(args.out))
    print(f"\n4. one hybrid run in bf16, {run.n_train} train / {run.n_eval} eval texts, 3 + 3 epochs, "
          f"r = 64 -> 32 -> 16, rank sweep {run.sweep_ranks} x {run.sweep_kinds}: wall {wall:.1f} s")
    for phase, s in sorted(seconds.items(), key=lambda kv: -kv[1]) + [("other", wall - sum(seconds.values()))]:
        print(f"  {phase:<32} {s:8.1f} s  {s / wall:6.1%}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
