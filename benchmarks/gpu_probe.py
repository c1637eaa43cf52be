"""Where a run's time goes on a CUDA GPU, for a GPT-2-124M-architecture model, in fp32,
fp16 + GradScaler and bf16, against a bare PEFT training loop on the same batches.

    python benchmarks/gpu_probe.py [--n-train 1200] [--method hybrid] [--out /tmp/gpu_probe]

The model is "openai-community/gpt2" from the hub when it can be loaded, else a GPT-2-124M of random weights
(GPT2Config() defaults: 12 layers, width 768, vocabulary 50257) with the byte tokenizer, saved
to a temporary folder; the data are ../shared/data when present, else the built-in corpus.
For each precision: one run of `--method` through `run_experiment` (3 + 3 epochs, r = 64,
64 -> 32 -> 16, the paper's rank sweep, n_eval = n_train / 3) split by phase as in
benchmarks/pipeline.py; peak GPU memory; training tokens per second; and the floor: a bare
loop (forward, loss, backward, AdamW step over PEFT's LoRA; no regularizers, checkpoints or
evaluation) over the same training batches. On a machine without a CUDA GPU it says so and
exits 0. `--device cpu` runs the same code on the CPU with a tiny model (a check of this
script, not a measurement).
"""
import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import SHARED, run_split  # noqa: E402

from hybrid_lora import ExperimentConfig, build_model  # noqa: E402
from hybrid_lora.data import make_loaders  # noqa: E402
from hybrid_lora.evaluate import autocast, choose_amp_dtype  # noqa: E402
from hybrid_lora.losses import causal_lm_sums  # noqa: E402


def gpt2_124m(folder: Path) -> str:
    """"openai-community/gpt2" if the hub has it, else a random GPT-2-124M saved in `folder` (with a byte tokenizer)."""
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

    try:
        AutoConfig.from_pretrained("openai-community/gpt2")
        return "openai-community/gpt2"
    except Exception:  # no network / no cache: same architecture, random weights
        from hybrid_lora.adapters import byte_tokenizer

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        return str(folder)


def bare_loop(cfg, steps: int) -> tuple[float, int]:
    """(seconds, tokens) of `steps` plain PEFT training steps over the run's first batches."""
    device = torch.device(cfg.device)
    model, tok = build_model(cfg, device)
    amp = choose_amp_dtype(cfg.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    loader = make_loaders(cfg, tok, cfg.domains[0], seed=42).train
    batches = [b for _, b in zip(range(steps), loader)]
    model.train()
    tokens, start = torch.zeros((), dtype=torch.long, device=device), None
    for i, (ids, mask, labels) in enumerate(batches):
        if i == 2:  # two warm-up steps
            sync(device)
            start = time.perf_counter()
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        with autocast(device, amp):
            logits = model(input_ids=ids, attention_mask=mask).logits
        ce, n, _ = causal_lm_sums(logits, labels, with_hits=False)
        opt.zero_grad(set_to_none=True)
        scaler.scale(ce / n).backward()
        scaler.step(opt)
        scaler.update()
        if i >= 2:
            tokens += n  # on the device: no host sync per step in the floor loop
    sync(device)
    return time.perf_counter() - start, int(tokens)


def trained_tokens(cfg) -> int:
    """Labelled tokens a run of `cfg` trains on: every epoch of every stage over its domain."""
    from hybrid_lora.adapters import load_tokenizer

    tok = load_tokenizer(cfg)
    total = 0
    for domain, epochs in zip(cfg.domains, (cfg.epochs_stage1, cfg.epochs_stage2)):
        labels = make_loaders(cfg, tok, domain, seed=42).train.dataset.tensors[2]
        total += epochs * int((labels[:, 1:] != -100).sum())
    return total


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--method", default="hybrid")
    p.add_argument("--out", default="/tmp/gpu_probe")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_probe: no CUDA GPU on this machine; nothing was measured.")
        return 0
    data = dict(data_source="local", data_dir=str(SHARED / "data")) if (SHARED / "data").is_dir() \
        else dict(data_source="builtin")
    with tempfile.TemporaryDirectory() as tmp:
        if args.device == "cuda":
            model = gpt2_124m(Path(tmp))
            name = torch.cuda.get_device_name()
            precisions = ["no", "fp16"] + (["bf16"] if torch.cuda.get_device_capability()[0] >= 8 else [])
        else:
            model, name, precisions = "tiny-random-gpt2", "CPU (check of the script only)", ["no"]
            args.n_train = min(args.n_train, 48)
        cfg = dataclasses.replace(ExperimentConfig.paper(), model_name=model, n_train=args.n_train,
                                  n_eval=args.n_train // 3, seeds=(42,), device=args.device,
                                  methods=(args.method,), **data)
        print(f"{name}; model {model}; {args.method}, {cfg.n_train} train / {cfg.n_eval} eval texts "
              f"of {cfg.max_length} tokens, batch {cfg.batch_size}, epochs 3 + 3, r=64")
        rows = []
        for precision in precisions:
            run_cfg = dataclasses.replace(cfg, mixed_precision=precision)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, wall = run_split(run_cfg, args.method, Path(args.out) / precision)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
            bare_s, bare_tok = bare_loop(run_cfg, steps=min(50, cfg.n_train // cfg.batch_size))
            ours = trained_tokens(run_cfg) / seconds["training steps"]
            rows.append((precision, wall, seconds, peak, ours, bare_tok / bare_s))
            print(f"\n{precision}: wall {wall:.1f} s, peak GPU memory {peak:.2f} GiB")
            for phase, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
                print(f"  {phase:<32} {s:8.1f} s  {s / wall:6.1%}")
        print(f"\n{'precision':<10}{'wall s':>8}{'train share':>13}{'tok/s run':>11}{'tok/s bare':>12}"
              f"{'run/bare':>10}{'peak GiB':>10}")
        for precision, wall, seconds, peak, ours, bare in rows:
            print(f"{precision:<10}{wall:>8.1f}{seconds['training steps'] / wall:>13.3f}{ours:>11.0f}"
                  f"{bare:>12.0f}{ours / bare:>10.3f}{peak:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
