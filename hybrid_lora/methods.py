"""The method table: each method is data (which loss terms, which data, which adapter set-up).

The training loop has one code path; methods differ only by these fields (defect 5 of the
original: the ordering term must be off in every stage for plain `lora`). Stage 1 trains on
the first domain; every later stage t >= 2 on domain t, against the adapter after stage t - 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import METHOD_NAMES, ExperimentConfig

LAMBDA_FIELDS = {"dc": "lambda_dc", "l2": "lambda_l2", "ewc": "lambda_ewc", "olora": "lambda_olora",
                 "order": "lambda_order"}
RENAMED = {"joint": "cumulative"}  # result folders of schema <= 3 name methods by their old names


@dataclass(frozen=True)
class Method:
    name: str
    order: bool          # ordering regularizer in every stage
    dc: bool             # domain-correlation loss in every stage after the first
    scheduled: bool      # Stage 2 follows cfg.rank_schedule (rebuild each epoch)
    description: str
    nested: str | None = None  # rank-nested training in every stage: "dylora" (a sampled rank b
    #                            per step) or "matryoshka" (every prefix weighted in each step)
    small: bool = False   # train at the schedule's last rank instead of cfg.r
    penalty: str | None = None  # "l2" | "ewc" | "olora" in every stage after the first
    data: str = "current"       # "current" | "replay" | "cumulative" | "all" (data.stage_train_set)
    adapter: str = "continue"   # "continue" the adapter; "add": merge it into the base and add a
    #                             new one each stage (freeze-and-add); "reset": a new one each
    #                             stage from the base alone (each domain trained on its own)
    svd_nest: bool = False  # plain LoRA, then rotated into its SVD basis (same function) and nested
    #                         for the last svd_nest_fraction of each stage's steps
    allocation: str | None = None  # budgeted rank allocation across modules (allocation/):
    #                                "budget" re-allocates every stage, "protect" freezes what
    #                                earlier stages kept and allocates the new stage elsewhere;
    #                                "adalora": PEFT's AdaLoRA adapter and allocator

    def lambdas(self, cfg: ExperimentConfig, stage: int) -> tuple[float, float]:
        """(lambda_order, lambda_dc) in force in `stage`; 0.0 where the term is off."""
        return (cfg.lambda_order if self.order else 0.0,
                cfg.lambda_dc if self.dc and stage > 1 else 0.0)

    def penalty_lambda(self, cfg: ExperimentConfig, stage: int) -> float:
        """The weight of this method's continual-learning penalty in `stage` (0.0 if none)."""
        return getattr(cfg, LAMBDA_FIELDS[self.penalty]) if self.penalty and stage > 1 else 0.0

    def regularizer(self) -> str | None:
        """The name of the one lambda-weighted term a lambda sweep varies ("dc", "l2", ...,
        "order" for the paper's ordering term alone); None for none or two (hybrid)."""
        if self.dc and self.order:
            return None
        return "dc" if self.dc else "order" if self.order else self.penalty

    def train_rank(self, cfg: ExperimentConfig) -> int:
        """The LoRA rank the run starts with."""
        return cfg.rank_schedule[-1] if self.small else cfg.r

    def stage_ranks(self, cfg: ExperimentConfig, stage: int) -> tuple[int, ...]:
        """The LoRA rank of each epoch of `stage`; after Stage 2 a scheduled method stays at
        the schedule's last rank."""
        if stage >= 2 and self.scheduled:
            return cfg.rank_schedule if stage == 2 else (cfg.rank_schedule[-1],) * cfg.epochs_stage2
        return (self.train_rank(cfg),) * (cfg.epochs_stage1 if stage == 1 else cfg.epochs_stage2)

    def nest_mode(self, cfg: ExperimentConfig) -> str | None:
        """How the nested steps train: "dylora", "matryoshka" or None (`svd_nest`: cfg.svd_nest_mode)."""
        return cfg.svd_nest_mode if self.svd_nest else self.nested

    def cut_scaling(self, cfg: ExperimentConfig) -> str:
        """How this method's adapters are cut to a lower rank, in training (rebuild) and sweeps.

        Nested training (DyLoRA, Matryoshka) runs rank b with alpha/b, so its cuts keep lora_alpha
        ("dylora"; `rebuild_model_for_new_rank` calls it "peft"), except Matryoshka's "sum"
        weighting (sub-adapters at the adapter's own scaling: "preserve"); the others keep each
        kept component's contribution ("preserve") unless cfg.rebuild_scaling says "peft".
        """
        if self.svd_nest or (self.nested == "matryoshka" and cfg.matryoshka_weighting == "sum"):
            return "preserve"  # each sub-adapter at the adapter's own scaling (an SVD cut's)
        if self.nested:
            return "dylora"
        return "dylora" if cfg.rebuild_scaling == "peft" else "preserve"

    def check_config(self, cfg: ExperimentConfig) -> None:
        """ValueError naming the field when `cfg` asks this method for what it cannot do."""
        if cfg.rebuild_cut != "slice" and self.dc and self.scheduled and cfg.dc_variant != "delta_w":
            raise ValueError(f"ExperimentConfig.rebuild_cut={cfg.rebuild_cut!r} with method {self.name!r} and "
                             f"dc_variant={cfg.dc_variant!r}: an SVD cut rotates the factors, so DC would "
                             "compare them with the previous adapter's in another basis; use "
                             "dc_variant='delta_w' (basis-free) or rebuild_cut='slice'")

    def stage1_signature(self) -> tuple:
        """What of the method Stage 1 depends on: equal signatures (and configs) train the
        same Stage 1, so one run can reuse another's (`share_stage1`)."""
        nested = True if self.nested == "dylora" else self.nested  # True: DyLoRA in older keys
        # dynamic and dynamic_protect differ only from Stage 2 on
        allocation = "allocate" if self.allocation in ("budget", "protect") else self.allocation
        return (self.order, nested, self.small) + (("all",) if self.data == "all" else ()) \
            + (("svd_nest",) if self.svd_nest else ()) \
            + ((allocation,) if allocation else ())

    def reads_target_rank(self) -> bool:
        """Whether Stage 1 already depends on the rank schedule's last rank (trained at it, or
        allocating a budget of it)."""
        return self.small or self.allocation is not None


METHODS = {m.name: m for m in (
    Method("lora", False, False, False, "sequential LoRA: cross-entropy only, fixed rank "
           "(the continual-learning lower bound)"),
    Method("dylora", True, False, True, "CE + the paper's ordering regularizer (not DyLoRA's "
           "sampled-rank training: that is dylora_nested); Stage-2 rank schedule"),
    Method("dc", False, True, False, "CE + the paper's domain-correlation loss after Stage 1; fixed rank"),
    Method("hybrid", True, True, True, "CE + the paper's ordering regularizer + DC after Stage 1; "
           "Stage-2 rank schedule"),
    Method("dylora_nested", False, False, True, "true DyLoRA: CE at a sampled rank b per step "
           "(alpha/b), instead of the ordering term; Stage-2 rank schedule", nested="dylora"),
    Method("hybrid_nested", True, True, True, "hybrid with DyLoRA's sampled-rank training added "
           "to the ordering term and DC", nested="dylora"),
    Method("lora_small", False, False, False, "plain LoRA trained directly at the schedule's last "
           "rank (16 in the paper), lora_alpha unchanged", small=True),
    Method("matryoshka", False, False, True, "Matryoshka weighting: each step trains the mean of "
           "the rank-k sub-adapters (alpha/k, k in matryoshka_ranks) in one forward pass; Stage-2 "
           "rank schedule", nested="matryoshka"),
    Method("hybrid_matryoshka", False, True, True, "matryoshka + the paper's DC after Stage 1 "
           "(Matryoshka weighting in place of the ordering term); Stage-2 rank schedule",
           nested="matryoshka"),
    Method("single", False, False, False, "each domain trained alone: a new adapter from the base "
           "model every stage (the reference for plasticity)", adapter="reset"),
    Method("cumulative", False, False, False, "the adapter continues; stage t trains on the union "
           "of domains 1..t with the same number of steps (so only 1/t of them on the new domain); "
           "not an upper bound", data="cumulative"),
    Method("multitask", False, False, False, "one adapter from the base trained on the union of "
           "all domains in every stage: the budget of all stages together on all the data "
           "(the upper bound)", data="all"),
    Method("replay", False, False, False, "sequential LoRA plus a replay buffer of "
           "replay_fraction of every earlier domain", data="replay"),
    Method("l2", False, False, False, "CE + lambda_l2 * sum ||dW - dW_prev||_F^2 on each module's "
           "dW = s B A", penalty="l2"),
    Method("ewc", False, False, False, "CE + lambda_ewc * sum F (theta - theta_prev)^2, diagonal "
           "Fisher F on the earlier domains", penalty="ewc"),
    Method("freeze_add", False, False, False, "earlier adapters merged into the frozen base; a new "
           "adapter per stage", adapter="add"),
    Method("olora", False, False, False, "freeze-and-add + lambda_olora * sum ||A_old A_new^T||_F^2 "
           "(O-LoRA)", penalty="olora", adapter="add"),
    Method("dynamic", False, False, False, "budgeted allocation across modules: every module starts "
           "at rank r; the parameter budget falls to that of uniform rank rank_schedule[-1] (AdaLoRA's "
           "cubic schedule); components masked by one global threshold on importance; a later stage "
           "revives the zeroed components and re-allocates all", allocation="budget"),
    Method("dynamic_protect", False, False, False, "dynamic, but a later stage freezes the components "
           "earlier stages kept and allocates its own budget among the revived ones only",
           allocation="protect"),
    Method("adalora", False, False, False, "PEFT's AdaLoRA (SVD-form adapter, its own sensitivity "
           "allocation from rank r to target_r = rank_schedule[-1] per module on average, orthogonality "
           "penalty); the schedule restarts each stage", allocation="adalora"),
    Method("lora_svd_nested", False, False, True, "plain LoRA, rotated exactly into its SVD basis (the same "
           "function) for the last svd_nest_fraction of each stage's steps, trained there with Matryoshka "
           "weighting of sub-adapters at the adapter's own scaling (svd_nest_mode='dylora': one cut per "
           "step instead, as DyLoRA); cuts keep the scaling (as SVD's)",
           nested="matryoshka", svd_nest=True),
)}
assert tuple(METHODS) == METHOD_NAMES, "config.METHOD_NAMES and the method table disagree"


def get_method(name: str) -> Method:
    """The Method called `name`; ValueError naming the known ones otherwise."""
    name = RENAMED.get(name, name)  # an old result folder's method
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {tuple(METHODS)}")
    return METHODS[name]


def check_lambdas(lambdas: dict) -> None:
    """ValueError naming a method of a lambda sweep ({method: values}) that has no single
    lambda-weighted regularizer to vary, or a lambda that is negative or not finite."""
    for name, values in lambdas.items():
        if get_method(name).regularizer() is None:
            sweepable = [m for m in METHODS if METHODS[m].regularizer()]
            raise ValueError(f"--lambdas {name}=...: method {name!r} has no lambda-weighted "
                             f"regularizer to sweep; sweepable: {sweepable}")
        for lam in values:
            if not (math.isfinite(lam) and lam >= 0):
                raise ValueError(f"--lambdas {name}={lam}: a lambda must be a finite number >= 0")
