"""The one training loop: a stage of any method, epoch by epoch (the Stage-2 rank schedule),
with its DC / penalty terms, checkpoints and resume; devices and seeds. `runs.py` strings
stages into runs.
"""
from __future__ import annotations

import math
import platform
import random
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import count_trainable_params, current_rank, flatten_factors, lora_factors
from .allocation import allocating
from .checkpoint import rng_state, set_rng_state
from .config import ExperimentConfig
from .continual import StageReference, regularizer_terms
from .evaluate import autocast, choose_amp_dtype, evaluate_loss_and_token_acc, model_device
from .data import IGNORE_INDEX
from .distributed import all_reduce, all_reduce_grads, gather_objects, shard, world
from .families import enable_gradient_checkpointing
from .losses import causal_lm_sums, cosine_distance, orthogonality_penalty, ordering_penalty
from .methods import Method
from .nested import nested_training
from .ranks import cut_model_to_rank, rotate_to_svd


class NonFiniteLoss(ArithmeticError):
    """Training met a loss that is not finite (NaN or inf): the run stops there."""


class FiniteGuard:
    """Finds the first batch whose loss is not finite without a host sync per step: the batch
    index and each term's value are kept on the device, and `check` (one sync) raises
    `NonFiniteLoss` naming them. On CPU a check costs nothing, so it runs after every step."""

    def __init__(self, device: torch.device, stage: int, epoch: int):
        self.stage, self.epoch, self.names, self.values = stage, epoch, [], None
        self.batch = torch.full((), -1, dtype=torch.long, device=device)
        self.every = 1 if device.type == "cpu" else 20

    def record(self, batch: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Note `loss` of 0-based `batch` and its `terms` (name -> scalar tensor)."""
        bad = (self.batch < 0) & ~torch.isfinite(loss.detach())
        values = torch.stack([v.detach().float() for v in terms.values()])  # [n_terms]
        if self.values is None:  # the same terms at every step of an epoch
            self.names, self.values = list(terms), values
        else:
            self.values = torch.where(bad, values, self.values)
        self.batch = torch.where(bad, batch, self.batch)

    def check(self) -> None:
        batch = int(all_reduce(self.batch, "max").item())  # any process's failure stops them all
        if batch >= 0:
            terms = ", ".join(f"{n}={v:.6g}" for n, v in zip(self.names, self.values.tolist()))
            raise NonFiniteLoss(
                f"stage {self.stage}, epoch {self.epoch}, batch {batch} (0-based): the training loss "
                f"is not finite ({terms}). Training stopped; the run keeps its last good checkpoint "
                "and writes no metrics.json. Lower lr or the lambdas and start the run over.")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device, ValueError when this
    torch or machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch was built without CUDA" if torch.version.cuda is None
               else "torch finds no CUDA GPU on this machine")
        raise ValueError(f"device={name!r}: {why} (torch {torch.__version__}); use device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}: this machine or torch has no MPS (Apple GPU); use device=auto or cpu")
    return device


def _read_cpuinfo() -> str | None:
    """The text of /proc/cpuinfo; None where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def cpu_bf16_native(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read
    from /proc/cpuinfo (or the text `cpuinfo`); None where that cannot be read (macOS, Windows)."""
    cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
    if cpuinfo is None:
        return None
    flags = {word for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for word in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def machine_report(device: torch.device, cpuinfo: str | None = None) -> str:
    """One line naming what an epoch ran on (its speed and its bf16 rounding depend on it): the
    GPU's name, or the CPU's model name (/proc/cpuinfo, or `cpuinfo`) and whether it computes
    bf16; then torch's version and CPU threads. history.json's `machine`."""
    if device.type == "cuda":
        hw = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
        names = [line.split(":", 1)[1].strip() for line in (cpuinfo or "").splitlines()
                 if line.split(":")[0].strip() == "model name"]
        native = cpu_bf16_native(cpuinfo) if cpuinfo is not None else None
        bf16 = {True: "native", False: "emulated", None: "unknown"}[native]
        hw = f"CPU {names[0] if names else platform.processor() or platform.machine()} (bf16 {bf16})"
    return f"{hw}; torch {torch.__version__}; {torch.get_num_threads()} threads"


def warn_emulated_bf16(amp_dtype, device: torch.device) -> bool:
    """Warn, and return True, when bf16 autocast is asked for on a CPU that does not compute
    bf16 in hardware: torch then emulates it, slower than fp32 (docs/scaling.md)."""
    if amp_dtype is not torch.bfloat16 or device.type != "cpu" or cpu_bf16_native() is not False:
        return False
    warnings.warn("mixed_precision='bf16' on a CPU without bf16 instructions (no avx512_bf16, "
                  "amx_bf16 or bf16 in /proc/cpuinfo): torch emulates bf16 here, slower than fp32 "
                  "(docs/scaling.md, bf16 on the CPU). Use mixed_precision='no' "
                  "or 'auto' (fp32 on the CPU).", stacklevel=3)
    return True


def device_report(cfg: ExperimentConfig) -> str:
    """One line: the device a run of `cfg` uses and its precision (GPU name, or plainly CPU)."""
    device = resolve_device(cfg.device)
    amp = choose_amp_dtype(cfg.mixed_precision, device)
    precision = {None: "fp32", torch.float16: "fp16 autocast + GradScaler",
                 torch.bfloat16: "bf16 autocast"}[amp]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (f"GPU: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}); "
                f"{precision}, LoRA weights fp32")
    gpu = "a GPU is present but" if torch.cuda.is_available() else "no GPU found;"
    line = f"Running on {device.type.upper()} ({gpu} device={cfg.device!r}); {precision}"
    if device.type == "cpu":
        native = cpu_bf16_native()
        if native and amp is None:
            line += ("; this CPU computes bf16 natively: --set mixed_precision=bf16 (bf16 autocast, "
                     "LoRA weights fp32) trains and evaluates faster (docs/scaling.md, bf16 on the CPU)")
        elif native is not None:
            line += f"; this CPU computes bf16 {'natively' if native else 'only by emulation (slow)'}"
    return line


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _zero_sums(device: torch.device) -> dict:
    """The running sums of one epoch (device tensors: no host sync per step)."""
    return {"ce": torch.zeros((), dtype=torch.float64, device=device),
            "tokens": torch.zeros((), dtype=torch.long, device=device),
            "order": torch.zeros((), device=device), "dc": torch.zeros((), device=device),
            "penalty": torch.zeros((), device=device),
            "steps": 0, "seconds": 0.0}


def _probe(term, factors) -> tuple[float, float]:
    """(value, norm of its gradient w.r.t. all LoRA weights) of a regularizer term at the
    current weights: shows whether the term acts. Needs no forward pass of the model."""
    with torch.enable_grad():
        value = term()
        grads = torch.autograd.grad(value, [t for ab in factors for t in ab], allow_unused=True)
    return value.item(), torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)).item()


def _cross_entropy(model, batch, cfg: ExperimentConfig, device, amp_dtype, scaler, sums: dict):
    """This process's rows of a global batch in `cfg.gradient_accumulation_steps` micro-batches.
    Each micro-batch's CE sum is divided by the labelled tokens of the whole global batch (all
    processes), so the summed gradients are the whole batch's token-weighted mean. Backward runs
    for all but the last micro-batch; returns (the step's CE so far, detached; the last
    micro-batch's loss, or None when this process has no rows). Adds to `sums` "ce", "tokens"."""
    n_step = (batch[2][:, 1:] != IGNORE_INDEX).sum().to(device)
    mine = [shard(t) for t in batch]  # [rows of this process, T] each
    micro = list(zip(*(t.chunk(cfg.gradient_accumulation_steps) for t in mine))) if len(mine[0]) else []
    ce_step, loss = torch.zeros((), device=device), None
    for i, (input_ids, attention_mask, labels) in enumerate(micro):
        input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                             for t in (input_ids, attention_mask, labels))
        with autocast(device, amp_dtype):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        ce_b, n_b, _ = causal_lm_sums(logits, labels, with_hits=False)  # fp32 loss
        loss = ce_b / n_step.clamp(min=1)
        ce_step = ce_step + loss.detach()
        sums["ce"] += ce_b.detach().double()
        sums["tokens"] += n_b
        if i < len(micro) - 1:
            scaler.scale(loss).backward()
    return ce_step, loss


def train_stage(model, cfg: ExperimentConfig, method: Method, stage: int, train_loader, eval_loader,
                ranks: tuple[int, ...], reference: StageReference | None = None,
                amp_dtype: torch.dtype | None = None,
                progress: bool = True, resume: dict | None = None, checkpoint=None,
                evaluate_last: bool = True, tracking=None, step_offset: int = 0, val_loader=None):
    """Train one stage, one epoch per entry of `ranks`; returns (model, history rows).

    Before an epoch whose rank is below the model's, the model is rebuilt at that rank
    (scaling by `method.cut_scaling`) and gets a fresh optimizer. A `method.nested` method
    trains rank-nested (`nested.py`: DyLoRA's sampled rank per step, or Matryoshka weighting).
    The returned model may therefore be a new object: callers must use it. `reference` (`continual.stage_reference`: the adapter after
    the previous stage, EWC Fisher, earlier A matrices) enables the method's DC and penalty
    terms in this stage and, for a continued adapter, the `cos_to_stage1` column.
    `amp_dtype` (from `choose_amp_dtype`) autocasts the forward pass only: the LoRA weights,
    the regularizers and the loss sums stay fp32; fp16 adds a GradScaler.
    `train_loader.sampler` must be an `EpochSampler` (each epoch's order rebuilt on its own).
    Each epoch ends with an evaluation on `eval_loader`; `evaluate_last=False` leaves the last
    epoch's `eval_loss` / `eval_acc` None, for a caller that evaluates the model there anyway.
    With `val_loader` (the validation texts) each epoch is also evaluated there (`val_loss`,
    `val_acc`: the curve an epoch count is chosen on); None leaves them None.

    `checkpoint(model, position, state, rows)` is called every `cfg.checkpoint_every` steps
    and after each epoch. `resume` ({"epoch", "step", "rows", "state"} from such a call)
    continues from there: same batches, same optimizer/scaler state, same RNG stream.
    `tracking` (`tracking.Tracking`, main process; `cfg.report_to` on every process) gets each
    step's terms and each epoch's row at step `step_offset` + steps so far in the stage.
    """
    lam_order, lam_dc = method.lambdas(cfg, stage)
    if (lam_dc or method.penalty_lambda(cfg, stage)) and reference is None:
        raise ValueError(f"method {method.name!r} regularizes stage {stage} against the previous "
                         "adapter, but no reference was given")
    device = model_device(model)
    rebuild_scaling = {"preserve": "preserve", "dylora": "peft"}[method.cut_scaling(cfg)]
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    proc, n_proc = world()
    progress = progress and proc == 0
    start_epoch, start_step, rows, saved_sums = _restore(resume, optimizer, scaler, proc)
    epochs = tqdm(ranks, desc=f"stage {stage} ({method.name})", unit="epoch", disable=not progress,
                  initial=start_epoch - 1)
    steps_per_epoch = math.ceil(train_loader.sampler.length / train_loader.batch_size)
    alloc_state = resume["state"].get("allocator") if resume is not None else None
    with allocating(model, cfg, method.allocation, stage, len(ranks) * steps_per_epoch, alloc_state) as alloc:
        loop = _StageLoop(cfg, method, stage, reference, device, amp_dtype, scaler, alloc, lam_order, n_proc,
                          progress)
        loop.tracking, loop.step_base = tracking, step_offset  # step of (epoch, 0): + (epoch - 1) * steps
        loop.steps_per_epoch = steps_per_epoch
        total = len(ranks) * steps_per_epoch  # lora_svd_nested: rotated and nested from this step on
        loop.nest_from = total - math.ceil(cfg.svd_nest_fraction * total) if method.svd_nest else 0

        def save(model, optimizer, position, sums=None) -> None:  # on every process; process 0 writes
            checkpoint(model, position, _stage_state(optimizer, scaler, alloc, n_proc, sums), rows)

        for epoch, rank in enumerate(ranks, 1):
            if epoch < start_epoch:
                continue
            if rank != current_rank(model):
                model = cut_model_to_rank(model, rank, cfg.rebuild_cut, rebuild_scaling)
                optimizer = make_optimizer(model, cfg)
            skip = start_step if epoch == start_epoch else 0
            last = epoch == len(ranks) and not evaluate_last
            row = loop.epoch(model, optimizer, epoch, rank, train_loader, (eval_loader, val_loader), skip,
                             saved_sums if skip else None, save if checkpoint else None, skip_eval=last)
            rows.append(row)
            if tracking is not None:
                tracking.log_epoch(row, step_offset + epoch * steps_per_epoch)
            if alloc is not None:  # kept apart from history.json in allocation.json (runs.py)
                rows[-1]["allocation"] = alloc.log()
                if epoch == len(ranks):  # before the checkpoint: evaluation and saving need no hooks
                    alloc.finalize()
            epochs.update()
            if row["eval_loss"] is not None:
                epochs.set_postfix(eval_loss=f"{row['eval_loss']:.3f}", eval_acc=f"{row['eval_acc']:.3f}")
            if checkpoint:
                save(model, optimizer, (stage, epoch + 1, 0))
    epochs.close()
    return model, rows


def _restore(resume: dict | None, optimizer, scaler, proc: int):
    """(start epoch, start step, history rows, saved running sums) of a stage: from its start, or
    from `resume` (optimizer and scaler states loaded into them; the RNG state restored last,
    so nothing before it draws random numbers that the uninterrupted path would not)."""
    if resume is None:
        return 1, 0, [], None
    state = resume["state"]
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    saved_sums = state.get("sums")
    if saved_sums is not None and proc > 0:  # the saved CE sums are all processes' together
        saved_sums = {**saved_sums, "ce": torch.zeros_like(saved_sums["ce"]),
                      "tokens": torch.zeros_like(saved_sums["tokens"])}
    set_rng_state(state["rng_per_process"][proc] if "rng_per_process" in state else state["rng"])
    return resume["epoch"], resume["step"], list(resume["rows"]), saved_sums


def _stage_state(optimizer, scaler, alloc, n_proc: int, sums: dict | None = None) -> dict:
    """The `state` of a checkpoint (every process calls it; process 0 writes): optimizer and
    scaler states, the epoch's running sums (CE summed over processes), each process's RNG
    state when there are several, and the allocator's masks, averages and schedule position."""
    state = {"optimizer": optimizer.state_dict()}
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if sums is not None:
        sums = {**sums, "ce": all_reduce(sums["ce"]), "tokens": all_reduce(sums["tokens"])}
        state["sums"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in sums.items()}
    if n_proc > 1:  # each process's dropout stream, to resume each exactly
        state["rng_per_process"] = gather_objects(rng_state())
    if alloc is not None:  # masks, importance averages, schedule position
        state["allocator"] = alloc.state_dict()
    return state


class _StageLoop:
    """What every epoch of one stage shares (config, method, device, scaler, allocator, the
    lambdas); `epoch` trains one epoch and returns its history row."""

    def __init__(self, cfg, method, stage, reference, device, amp_dtype, scaler, alloc, lam_order, n_proc,
                 progress):
        self.cfg, self.method, self.stage, self.reference = cfg, method, stage, reference
        self.device, self.amp_dtype, self.scaler, self.alloc = device, amp_dtype, scaler, alloc
        self.lam_order, self.n_proc, self.progress = lam_order, n_proc, progress
        self.machine = machine_report(device)  # once per stage; a resumed run names its new machine
        self.tracking, self.step_base, self.steps_per_epoch = None, 0, 0  # set by train_stage
        self.nest_from = 0  # the stage's first nested step (0-based; lora_svd_nested: after the rotation)
        # (AdaLoRA's A and B alone are not its update: no cosine for it)
        self.cos_ref = reference if reference is not None and method.adapter == "continue" \
            and method.allocation != "adalora" else None

    def setup(self, model, optimizer, rank: int):
        """Done once per (re)build, not per step: (parameters, live factors, the previous-stage
        vector cut to `rank` for the cosine (so elements line up: defect 4), regularizer terms)."""
        cfg, method = self.cfg, self.method
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        factors = [(a, b) for _, a, b, _ in lora_factors(model)]
        scalings = [s for *_, s in lora_factors(model)]
        w_prev = flatten_factors(self.cos_ref.factors, rank) if self.cos_ref is not None else None
        terms = regularizer_terms(cfg, method, self.stage, factors, rank, self.reference, scalings)
        if method.allocation == "adalora" and cfg.orth_reg_weight:  # what PEFT's forward adds
            terms["penalty"] = lambda: cfg.orth_reg_weight * orthogonality_penalty(factors)
        return params, factors, w_prev, terms

    def epoch(self, model, optimizer, epoch: int, rank: int, train_loader, eval_loaders, skip: int,
              saved_sums, save, skip_eval: bool) -> dict:
        """Train epoch `epoch` at `rank` from step `skip` (with the interrupted epoch's
        `saved_sums`), calling `save(model, optimizer, position, sums)` every checkpoint_every
        steps; evaluate on `eval_loaders` (evaluation texts, validation texts or None) unless
        `skip_eval`. Returns the history row."""
        cfg, stage, device = self.cfg, self.stage, self.device
        params, factors, w_prev, terms = self.setup(model, optimizer, rank)
        sums = _zero_sums(device)
        if saved_sums is not None:
            sums = {k: v.to(device) if torch.is_tensor(v) else v for k, v in saved_sums.items()}
        train_loader.sampler.set_epoch(stage, epoch, skip * train_loader.batch_size)
        n_batches, step = skip + len(train_loader), skip
        guard = FiniteGuard(device, stage, epoch)
        start = time.perf_counter() - sums["seconds"]
        with nested_training(model, cfg, self.method.nest_mode(cfg), self.method.cut_scaling(cfg)) as nest:
            model.train()
            batches = tqdm(train_loader, desc=f"epoch {epoch} r={rank}", leave=False, unit="batch",
                           disable=not self.progress, initial=skip, total=n_batches)
            for batch in batches:
                at = (epoch - 1) * self.steps_per_epoch + step  # this step in the stage, 0-based
                if self.method.svd_nest and at == self.nest_from:  # the same function, SVD-ordered
                    rotate_to_svd(model)
                    optimizer.state.clear()  # Adam's moments belong to the old basis
                nest_now = nest if at >= self.nest_from else None
                if nest is not None and nest_now is None:
                    nest.full()  # plain LoRA steps before the nested ones
                parts = self.step(model, optimizer, params, factors, terms, nest_now, batch, sums, guard, step)
                step += 1
                if cfg.report_to:
                    self.track(parts, rank, self.step_base + (epoch - 1) * self.steps_per_epoch + step)
                if step % guard.every == 0:
                    guard.check()
                if self.progress and step % 20 == 0:  # .item() syncs the device: only now and then
                    batches.set_postfix(ce=f"{(sums['ce'] / sums['tokens']).item():.3f}")
                if save and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < n_batches:
                    sums["seconds"] = time.perf_counter() - start
                    guard.check()  # never checkpoint past a non-finite step
                    save(model, optimizer, (stage, epoch, step), sums)
            guard.check()
            if nest is not None:
                nest.full()
            train_seconds = time.perf_counter() - start  # the steps (and checkpoints), no evaluation
            ev = [{"loss": None, "acc": None} if skip_eval or loader is None
                  else evaluate_loss_and_token_acc(model, loader, self.amp_dtype) for loader in eval_loaders]
        return self.history_row(model, epoch, rank, factors, w_prev, terms, sums, ev, start, train_seconds)

    def step(self, model, optimizer, params, factors, terms, nest, batch, sums, guard, step: int) -> None:
        """One optimizer step: CE over the batch's micro-batches, then the regularizers (once per
        step, weight 1/world on each process), backward, gradients summed over processes, the
        allocator's observation between `scaler.unscale_` and `scaler.step`. Returns the step's
        terms ({"ce", "order", "dc", "penalty"}, those in force; scalar tensors)."""
        alloc, scaler = self.alloc, self.scaler
        if nest is not None:  # DyLoRA: this step trains rank b only; Matryoshka: all prefixes
            nest.begin(nest.next_rank())
        if alloc is not None:
            alloc.before_step()
        optimizer.zero_grad(set_to_none=True)
        ce_step, loss = _cross_entropy(model, batch, self.cfg, self.device, self.amp_dtype, scaler, sums)
        # The regularizers join the last micro-batch's loss: once per optimizer step,
        # with weight 1/world on each process (their gradients are summed).
        parts = {"ce": ce_step}
        if self.lam_order:
            parts["order"] = self.lam_order * ordering_penalty(factors)
            sums["order"] += parts["order"].detach()
        for name, term in terms.items():  # "dc", "penalty"
            parts[name] = term()
            sums[name] += parts[name].detach()
        for name in list(parts)[1:]:
            loss = parts[name] / self.n_proc if loss is None else loss + parts[name] / self.n_proc
        guard.record(step, sum(parts.values()), parts)
        if loss is not None:
            scaler.scale(loss).backward()  # plain backward/step when the scaler is disabled
        all_reduce_grads(params)
        if alloc is not None:  # importance from this step's gradients, unscaled
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            alloc.observe()
        scaler.step(optimizer)
        scaler.update()
        if nest is not None:
            nest.end()
        if alloc is not None:
            alloc.after_step()
        sums["steps"] += 1
        return parts

    def track(self, parts: dict, rank: int, step: int) -> None:
        """Send one step's terms to the trackers (`cfg.report_to`): the CE summed over processes
        (each holds its rows' share of the batch mean), the regularizers as weighted in the loss."""
        values = torch.stack([v.detach().float() for v in parts.values()])
        if self.n_proc > 1:
            values[0] = all_reduce(values[0])
        if self.tracking is not None:
            self.tracking.log({**{f"train/{k}": v for k, v in zip(parts, values.tolist())},
                               "train/rank": rank}, step)

    def basis_changed(self, epoch: int, rank: int) -> bool:
        """Whether the factors were rotated in this stage by the end of `epoch` (an SVD cut of the
        rank schedule, or `svd_nest`'s rotation): B A is kept but A and B are not, so their cosine
        to the previous stage's factors means nothing and `cos_to_stage1` is left None."""
        cut = self.cfg.rebuild_cut != "slice" and rank < self.method.stage_ranks(self.cfg, self.stage)[0]
        return cut or bool(self.method.svd_nest and epoch * self.steps_per_epoch > self.nest_from)

    def history_row(self, model, epoch, rank, factors, w_prev, terms, sums, ev, start, train_seconds) -> dict:
        """The epoch's row of history.json (HISTORY_KEYS): mean train terms, evaluations `ev`
        ([evaluation texts, validation texts]), cosine to
        the previous stage's adapter, the regularizers' end values and gradient norms, times."""
        cos = None
        if w_prev is not None and not self.basis_changed(epoch, rank):
            with torch.no_grad():
                cos = 1.0 - cosine_distance(w_prev, flatten_factors(factors)).item()
        steps = max(sums["steps"], 1)
        sums["ce"], sums["tokens"] = all_reduce(sums["ce"]), all_reduce(sums["tokens"])  # all processes' rows
        dc_end, dc_grad = _probe(terms["dc"], factors) if "dc" in terms else (None, None)
        pen_end, pen_grad = _probe(terms["penalty"], factors) if "penalty" in terms else (None, None)
        return {
            "stage": self.stage, "epoch": epoch, "rank": rank,
            "train_ce": (sums["ce"] / sums["tokens"].clamp(min=1)).item(),
            "train_order": sums["order"].item() / steps, "train_dc": sums["dc"].item() / steps,
            "train_penalty": sums["penalty"].item() / steps,
            "eval_loss": ev[0]["loss"], "eval_acc": ev[0]["acc"], "val_loss": ev[1]["loss"], "val_acc": ev[1]["acc"],
            "cos_to_stage1": cos,
            "dc_end": dc_end, "dc_grad_norm": dc_grad,
            "penalty_end": pen_end, "penalty_grad_norm": pen_grad,
            "trainable_params": count_trainable_params(model),
            "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
            "machine": self.machine,
        }
