"""`ExperimentConfig`: every knob of a run in one dataclass, validated on construction.

Defaults equal the paper (GPT-2, LoRA r=64 / alpha=32 on `c_attn`, 3 + 3 epochs,
Stage-2 ranks 64 -> 32 -> 16, lambda_order=1e-4, lambda_dc=0.1). Presets are
classmethods; change fields inline with `dataclasses.replace` (which re-validates).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from dataclasses import dataclass

from .sources import DATA_FILE_BUILDERS

PAPER_METHODS = ("lora", "dylora", "dc", "hybrid")
# continual-learning baselines ("lora" is sequential LoRA; "multitask" the upper bound)
CL_METHODS = ("single", "cumulative", "multitask", "replay", "l2", "ewc", "freeze_add", "olora")
# + true DyLoRA (nested-dropout) training, plain LoRA trained at the final rank, and
# Matryoshka-style nested weighting (every prefix trained at every step)
METHOD_NAMES = PAPER_METHODS + ("dylora_nested", "hybrid_nested", "lora_small", "matryoshka",
                                "hybrid_matryoshka") + CL_METHODS
# + budgeted rank allocation across modules by importance (allocation.py)
METHOD_NAMES += ("dynamic", "dynamic_protect", "adalora")
# + plain LoRA rotated into its SVD basis and trained nested for the last steps (rank flexibility)
METHOD_NAMES += ("lora_svd_nested",)
ALLOCATING_METHODS = ("dynamic", "dynamic_protect", "adalora")
IMPORTANCES = ("sensitivity", "fisher", "activation")  # importance.py
DYLORA_DISTRIBUTIONS = ("uniform", "geometric", "ranks")
MATRYOSHKA_WEIGHTINGS = ("mean", "sum")  # nested.matryoshka_weights
SVD_NEST_MODES = ("matryoshka", "dylora")  # lora_svd_nested: how its last steps nest
SWEEP_KINDS = ("slice", "svd", "svd_alloc")
DATA_SOURCES = ("hub", "local", "builtin")
REPORTERS = ("tensorboard", "wandb")  # report_to: accelerate's trackers (tracking.py)
BUILTIN_DOMAINS = ("imdb", "yelp", "code")
HUB_DOMAINS = {  # domain -> (dataset name, train split, eval split, text column)
    "imdb": ("stanfordnlp/imdb", "train", "test", "text"),
    "yelp": ("fancyzhx/yelp_polarity", "train", "test", "text"),
    "code": ("codeparrot/codeparrot-clean-valid", "train", None, "content"),  # eval: held out of train
}
# Any other text dataset is a domain written "<dataset>[@<config>]:<column>[:<train split>[:<eval split>]]",
# e.g. "fancyzhx/ag_news:text", "Salesforce/wikitext@wikitext-2-raw-v1:text", "my/chats:messages:train:test",
# "notes/reviews.csv:body" (a hub id, a local dataset folder, or a .jsonl/.json/.csv/.parquet/.txt file;
# see texts.parse_domain; an old unnamespaced id such as "ag_news" is translated, sources.HUB_ALIASES).
# The shipped domain sequences (`ExperimentConfig.forgetting(sequence=...)`, CLI --sequence).
SEQUENCES = {
    "imdb-yelp": ("imdb", "yelp"),        # the paper's pair: similar domains, the control
    "imdb-code": ("imdb", "code"),        # prose -> Python source: forgets
    "code-imdb": ("code", "imdb"),
    "imdb-code-yelp": ("imdb", "code", "yelp"),
}
TINY_MODEL = "tiny-random-gpt2"  # built from GPT2Config, no download
# tiny random models of other families (built from their configs; families.py) -> model_type
TINY_MODELS = {TINY_MODEL: "gpt2", "tiny-random-llama": "llama", "tiny-random-qwen2": "qwen2",
               "tiny-random-gpt-neox": "gpt_neox", "tiny-random-opt": "opt"}
TARGET_KEYWORDS = ("attention", "all-linear")  # target_modules spellings that stand alone
DEVICES = ("auto", "cpu", "cuda", "mps")
REBUILD_SCALINGS = ("preserve", "peft")
REBUILD_CUTS = ("slice", "svd", "svd_a_scale")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# Fields that do not change a run's numbers: a run may resume (or be skipped as complete)
# under a config that differs from its saved config.json only in these.
RUN_INDEPENDENT_FIELDS = ("methods", "seeds", "checkpoint_every", "keep_checkpoints")
RUN_INDEPENDENT_FIELDS += ("share_stage1", "report_to")
# How the same computation is laid out: results agree to float rounding.
RUN_INDEPENDENT_FIELDS += ("gradient_accumulation_steps", "gradient_checkpointing", "eval_batch_size",
                           "device")  # a run started on one device may go on on another
# Fields that only stages 2, 3, ... read: they may change between a Stage-1-only call and
# Stage 2, and runs that differ only in them share one Stage 1 (`share_stage1`).
STAGE2_FIELDS = ("lambda_dc", "dc_variant", "rank_schedule", "epochs_stage2", "rebuild_scaling", "rebuild_cut",
                 "lambda_l2", "lambda_ewc", "lambda_olora", "replay_fraction", "ewc_samples",
                 "sweep_ranks", "sweep_kinds", "sweep_n_eval")
# Fields read only after the last stage has trained (the rank sweep): an unfinished run may
# change them at any point; a finished one is swept again with `sweep-ranks`.
SWEEP_FIELDS = ("sweep_ranks", "sweep_kinds", "sweep_n_eval")
SEED_LIMIT = 2 ** 63
DC_VARIANTS = ("global", "per_module", "delta_w")
PRESETS = ("paper", "smoke", "forgetting", "rank_flex", "dynamic")
FLOAT_FIELDS = ("lora_alpha", "lora_dropout", "lr", "weight_decay", "lambda_order", "lambda_dc",
                "lambda_l2", "lambda_ewc", "lambda_olora", "replay_fraction", "dylora_p",
                "alloc_tinit", "alloc_tfinal", "alloc_beta1", "alloc_beta2", "orth_reg_weight",
                "svd_nest_fraction")


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of a run over a sequence of domains (Stage 1, 2, ...). Field names
    follow the paper and PEFT."""

    # base model: a hub id, a local folder, a GGUF file, or a key of TINY_MODELS (random, from a config)
    model_name: str = "openai-community/gpt2"
    tiny_n_layer: int = 2  # only used by TINY_MODELS
    tiny_n_embd: int = 64
    tiny_n_head: int = 2
    base_seed: int = 0  # seeds the random init of TINY_MODELS, so every rebuild gets the same base
    # LoRA (PEFT names)
    r: int = 64
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    # module names, "attention" (the family's attention projections: GPT-2 c_attn, LLaMA
    # q/k/v/o_proj, ...; families.ATTENTION_MODULES) or "all-linear" (PEFT's meaning)
    target_modules: tuple[str, ...] = ("attention",)
    # data
    domains: tuple[str, ...] = ("imdb", "yelp")  # one per stage: Stage 1, Stage 2, ...
    data_source: str = "hub"  # "hub" (HF datasets), "local" (<data_dir>/<domain>.jsonl), "builtin"
    data_dir: str | None = None
    n_train: int = 3000
    n_eval: int = 1000
    n_val: int = 0  # validation texts per domain, carved from the training pool (lambdas are chosen on these)
    data_seed: int = 42  # draws the evaluation and validation texts (the same for every run seed)
    train_data_seed: int | None = None  # draws the training subset; None: the run's seed (data noise in the intervals)
    max_length: int = 128
    batch_size: int = 8  # sequences per optimizer step (all micro-batches and processes together)
    eval_batch_size: int | None = None  # None: batch_size
    # optimisation
    epochs_stage1: int = 3
    epochs_stage2: int = 3  # epochs of every stage after the first
    lr: float = 5e-5
    weight_decay: float = 0.01  # torch.optim.AdamW's default
    gradient_accumulation_steps: int = 1  # split each batch into this many micro-batches (memory)
    gradient_checkpointing: bool = False  # recompute activations in backward (memory for time)
    lambda_order: float = 1e-4
    lambda_dc: float = 0.1
    dc_variant: str = "global"  # paper: cosine of all A, B flattened; "per_module"; "delta_w" (of B A)
    rank_schedule: tuple[int, ...] = (64, 32, 16)  # Stage-2 rank of each epoch; later stages keep the last
    rebuild_scaling: str = "preserve"  # "preserve" or "peft" (the original's alpha/r drift)
    # which components a schedule cut keeps: "slice" (the first ones, the paper) or "svd" (the
    # best rank-k approximation of each module's delta W: rotated into its SVD basis, then sliced);
    # "svd_a_scale": the same cut with A's rows kept at the old A's RMS norm (ranks.rotate_to_svd)
    rebuild_cut: str = "slice"
    # continual-learning baselines (methods l2, ewc, olora, replay); lambdas as in each paper's loss
    lambda_l2: float = 0.1      # sum over modules ||dW - dW_prev||_F^2
    lambda_ewc: float = 1e4     # sum F (theta - theta_prev)^2, F the mean per-sequence squared gradient
    lambda_olora: float = 0.5   # sum over modules ||A_old A_new^T||_F^2
    replay_fraction: float = 0.02  # replay: this share of each earlier domain's n_train joins the stage
    ewc_samples: int = 200      # earlier-domain training sequences the diagonal Fisher is averaged over
    share_stage1: bool = True   # reuse an identical Stage 1 of another run in the same output folder
    # true DyLoRA training (methods *_nested): each step one rank b ~ p_B on [dylora_r_min, r]
    dylora_r_min: int = 1
    dylora_distribution: str = "uniform"  # or "geometric": p_B(b) ~ p (1 - p)^(b - r_min); or "ranks":
    #                                        b uniform over the evaluated ranks (sweep_ranks <= r, and r)
    dylora_p: float = 0.15
    dylora_frozen: bool = False  # True: update only component b (the paper's FROZEN mode)
    # Matryoshka weighting (methods *matryoshka): each step trains the mean of the rank-k
    # sub-adapters (first k components at alpha/k) for k in these ranks; () = 1, 2, 4, ... up to r
    matryoshka_ranks: tuple[int, ...] = ()
    # "mean": the mean of the sub-adapters, each at alpha/k (cuts keep alpha: scaling "dylora");
    # "sum": their sum, each at the adapter's own scaling (MatryoshkaLoRA's reference code: its
    # default lora_scaling "none" with the "diag" mask; cuts keep the scaling: "preserve")
    matryoshka_weighting: str = "mean"
    svd_nest_fraction: float = 0.1  # method lora_svd_nested: the last share of a stage's steps, nested
    # how those steps nest: "matryoshka" (one diagonal-weighted adapter per step, matryoshka_weighting),
    # "dylora" (one cut per step, b drawn by dylora_distribution, at the adapter's own scaling: each
    # step trains exactly a function the sweep evaluates)
    svd_nest_mode: str = "matryoshka"
    # budgeted allocation (methods dynamic*): every module starts at rank r; the budget falls to
    # the parameters of uniform rank rank_schedule[-1] on AdaLoRA's cubic schedule; names after
    # AdaLoraConfig's tinit / tfinal (here fractions of a stage's steps), deltaT, beta1, beta2
    importance: str = "sensitivity"  # the estimator that ranks components: one of IMPORTANCES
    alloc_tinit: float = 0.1    # share of a stage's steps before the budget starts to fall
    alloc_tfinal: float = 0.2   # share of a stage's steps trained at the final allocation
    alloc_delta_t: int = 5      # steps between re-allocations while the budget falls
    alloc_regrow: bool = False  # masked components keep a live gradient (their A rows), so their
    #                             scores follow their importance and they can come back; False:
    #                             a plain 0 multiplier, under which masking is final in effect
    alloc_beta1: float = 0.85   # EMA of the importance estimates
    alloc_beta2: float = 0.85   # EMA of the sensitivity's uncertainty
    orth_reg_weight: float = 0.5  # method adalora: AdaLoraConfig's weight of ||P P^T - I|| terms
    # post-hoc rank sweep of each run's Stage-1 and final adapters (ranks above an adapter's skipped)
    sweep_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    sweep_kinds: tuple[str, ...] = ("slice", "svd")  # slice: first k components; svd: best rank k;
    #                                                  svd_alloc: rank k's parameters spread over modules by singular value
    sweep_n_eval: int | None = None  # the sweep evaluates the first N evaluation texts (None: all)
    # runs
    methods: tuple[str, ...] = PAPER_METHODS
    seeds: tuple[int, ...] = (42, 43, 44)
    device: str = "auto"
    mixed_precision: str = "auto"  # auto: fp32 on CPU, bf16 on CUDA >= sm80, fp16 + GradScaler below (T4)
    # checkpoints (resume after an interruption): every N optimizer steps and at each epoch end
    # experiment tracking: () / "none", or any of REPORTERS ("tensorboard": <run>/tensorboard/;
    # "wandb"), through accelerate's trackers (tracking.py); the run's numbers do not depend on it
    report_to: tuple[str, ...] = ()
    checkpoint_every: int = 200  # 0: only at epoch ends
    keep_checkpoints: bool = False  # keep <run>/checkpoints/ after the run completes

    def __post_init__(self) -> None:
        # JSON and the CLI give lists; keep tuples so the config stays hashable and frozen.
        for name in ("target_modules", "domains", "rank_schedule", "methods", "seeds", "sweep_ranks",
                     "sweep_kinds", "matryoshka_ranks", "report_to"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))
        self.validate()

    # ---------------------------------------------------------------- presets
    @classmethod
    def paper(cls) -> "ExperimentConfig":
        """The paper's setting: GPT-2 from the hub, IMDb -> Yelp, 3000/1000 samples."""
        return cls()

    @classmethod
    def smoke(cls) -> "ExperimentConfig":
        """A CPU run of seconds: tiny random GPT-2, byte tokenizer, built-in corpus."""
        return cls(
            model_name=TINY_MODEL, r=8, lora_alpha=16.0, rank_schedule=(8, 4, 2), sweep_ranks=(1, 2, 4, 8),
            data_source="builtin", n_train=256, n_eval=64, max_length=64, batch_size=8,
            epochs_stage1=2, epochs_stage2=3, lr=5e-3, seeds=(42,), device="cpu",
        )

    @classmethod
    def forgetting(cls, sequence: str = "imdb-code") -> "ExperimentConfig":
        """The continual-learning study: a shipped domain `sequence` (SEQUENCES), sequential
        LoRA, the paper's DC and the baselines, one fixed rank, no rank schedule or sweep.
        Set `model_name` (e.g. "openai-community/gpt2", or an offline base) and the data source.
        On a CPU that computes bf16 (`device_report` says so), a real model trains faster with
        mixed_precision="bf16"."""
        if sequence not in SEQUENCES:
            raise ValueError(f"sequence={sequence!r}: must be one of {tuple(SEQUENCES)}")
        return cls(
            domains=SEQUENCES[sequence], r=16, lora_alpha=32.0, rank_schedule=(16,),
            epochs_stage1=1, epochs_stage2=1, n_train=500, n_eval=200, n_val=100, lr=1e-3,
            methods=("lora", "dc") + CL_METHODS, sweep_ranks=(), sweep_kinds=(),
            seeds=(42, 43, 44, 45, 46),
        )

    @classmethod
    def rank_flex(cls, sequence: str = "imdb-yelp") -> "ExperimentConfig":
        """The rank-flexibility benchmark on a shipped domain `sequence`: LoRA, true DyLoRA,
        Matryoshka and the paper's ordering term, r = 64 without a rank schedule, every adapter
        swept by slicing on the evaluation and the validation texts (lambdas are chosen on
        those), 5 seeds. Add the per-rank references with `run --ranks lora=1,2,4,8,16,32` and
        the lambda sweep with `--lambdas dylora=0.001,0.01,0.1`; set `model_name` and the data.
        On a CPU that computes bf16 (`device_report` says so), a real model trains faster with
        mixed_precision="bf16"."""
        if sequence not in SEQUENCES:
            raise ValueError(f"sequence={sequence!r}: must be one of {tuple(SEQUENCES)}")
        return cls(
            domains=SEQUENCES[sequence], r=64, lora_alpha=32.0, rank_schedule=(64, 64),
            epochs_stage1=2, epochs_stage2=2, n_train=500, n_eval=200, n_val=100, lr=1e-3,
            methods=("lora", "dylora_nested", "matryoshka", "dylora"), sweep_kinds=("slice",),
            seeds=(42, 43, 44, 45, 46),
        )

    @classmethod
    def dynamic(cls, sequence: str = "imdb-code") -> "ExperimentConfig":
        """The allocation study on a shipped domain `sequence`: LoRA on every linear layer
        (`all-linear`), every module starting at r = 16, the budget that of uniform rank 8
        (rank_schedule[-1]) on every module: `dynamic` and `adalora` against uniform LoRA at the
        budget (`lora_small`) and plain LoRA at 16 (swept to the budget by SVD, uniform and
        allocated: sweep kinds svd, svd_alloc at rank 8); `dynamic_protect` against `lora`,
        `l2` and `ewc`; 5 seeds. Set `model_name` and the data. On a CPU that computes bf16
        (`device_report` says so), a real model trains faster with mixed_precision="bf16"."""
        if sequence not in SEQUENCES:
            raise ValueError(f"sequence={sequence!r}: must be one of {tuple(SEQUENCES)}")
        return cls(
            domains=SEQUENCES[sequence], target_modules=("all-linear",), r=16, lora_alpha=32.0,
            rank_schedule=(8, 8), epochs_stage1=2, epochs_stage2=2, n_train=500, n_eval=200, n_val=100,
            lr=1e-3, methods=("lora_small", "dynamic", "adalora", "lora", "dynamic_protect", "l2", "ewc"),
            sweep_ranks=(8,), sweep_kinds=("svd", "svd_alloc"), seeds=(42, 43, 44, 45, 46),
        )

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the field and the bad value (the first bad one, checked group
        by group in this order)."""
        self._check_sizes()
        self._check_numbers()
        self._check_layout()
        self._check_rank_schedule()
        self._check_runs()
        self._check_data()
        self._check_rank_methods()
        self._check_allocation()
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise self._bad("mixed_precision", f"must be one of {MIXED_PRECISIONS}")

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"ExperimentConfig.{name}={getattr(self, name)!r}: {why}")

    def _check_sizes(self) -> None:
        """Positive sizes: ranks, lengths, batch, counts, the tiny model."""
        for name in ("r", "max_length", "batch_size", "n_train", "n_eval",
                     "tiny_n_layer", "tiny_n_embd", "tiny_n_head"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise self._bad(name, "must be a positive integer")
        if self.max_length < 2:  # a next-token label needs a token before it
            raise self._bad("max_length", "must be at least 2 (one token to predict the next from)")

    def _check_numbers(self) -> None:
        """Finite numbers in range: learning rate, alpha, dropout, lambdas, epochs."""
        for name in FLOAT_FIELDS:  # NaN passes every comparison below, so test it first
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise self._bad(name, "must be a number")
            if not math.isfinite(value):
                raise self._bad(name, "must be a finite number")
        for name in ("epochs_stage1", "epochs_stage2", "checkpoint_every", "ewc_samples", "n_val"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise self._bad(name, "must be a non-negative integer")
        if self.lora_alpha <= 0:
            raise self._bad("lora_alpha", "must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise self._bad("lora_dropout", "must be in [0, 1)")
        if self.lr <= 0:
            raise self._bad("lr", "must be positive")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise self._bad("replay_fraction", "must be in [0, 1]")
        for name in ("lambda_order", "lambda_dc", "weight_decay", "lambda_l2", "lambda_ewc", "lambda_olora",
                     "orth_reg_weight"):
            if getattr(self, name) < 0:
                raise self._bad(name, "must be >= 0")

    def _check_layout(self) -> None:
        """Target modules, gradient accumulation, evaluation batch sizes."""
        if not self.target_modules:
            raise self._bad("target_modules", "name at least one module")
        if len(self.target_modules) > 1 and set(self.target_modules) & set(TARGET_KEYWORDS):
            raise self._bad("target_modules", f"{' and '.join(TARGET_KEYWORDS)} stand alone; do not mix them with names")
        if not isinstance(self.gradient_accumulation_steps, int) or self.gradient_accumulation_steps < 1:
            raise self._bad("gradient_accumulation_steps", "must be a positive integer")
        if self.batch_size % self.gradient_accumulation_steps:
            raise self._bad("gradient_accumulation_steps", f"must divide batch_size={self.batch_size} "
                      "(batch_size counts the sequences of one optimizer step)")
        if self.sweep_n_eval is not None and (not isinstance(self.sweep_n_eval, int) or self.sweep_n_eval < 1):
            raise self._bad("sweep_n_eval", "must be a positive integer or None (None: every evaluation text)")
        if self.eval_batch_size is not None and (not isinstance(self.eval_batch_size, int)
                                                 or self.eval_batch_size < 1):
            raise self._bad("eval_batch_size", "must be a positive integer or None (None: batch_size)")

    def _check_rank_schedule(self) -> None:
        """The Stage-2 rank schedule and how a cut is rebuilt."""
        if not self.rank_schedule:
            raise self._bad("rank_schedule", "give one rank per Stage-2 epoch")
        for k in self.rank_schedule:
            if not isinstance(k, int) or k < 1:
                raise self._bad("rank_schedule", f"rank {k!r} is below 1")
            if k > self.r:
                raise self._bad("rank_schedule", f"rank {k} is above r={self.r}")
        if any(b > a for a, b in zip(self.rank_schedule, self.rank_schedule[1:])):
            raise self._bad("rank_schedule", "ranks must be non-increasing")
        if len(self.rank_schedule) != self.epochs_stage2:
            raise self._bad("rank_schedule", f"needs one rank per Stage-2 epoch "
                      f"(epochs_stage2={self.epochs_stage2}, got {len(self.rank_schedule)})")
        if self.rebuild_scaling not in REBUILD_SCALINGS:
            raise self._bad("rebuild_scaling", f"must be one of {REBUILD_SCALINGS}")
        if self.rebuild_cut not in REBUILD_CUTS:
            raise self._bad("rebuild_cut", f"must be one of {REBUILD_CUTS}")

    def _check_runs(self) -> None:
        """Methods and seeds."""
        for m in self.methods:
            if m not in METHOD_NAMES:
                raise self._bad("methods", f"unknown method {m!r}; known: {METHOD_NAMES}")
        if not self.seeds:
            raise self._bad("seeds", "give at least one seed")
        for name, seeds in (("seeds", self.seeds), ("base_seed", (self.base_seed,)),
                            ("train_data_seed", () if self.train_data_seed is None else (self.train_data_seed,))):
            for seed in seeds:  # numpy's SeedSequence refuses negative seeds, torch's above 2**64
                if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
                    raise self._bad(name, f"seed {seed!r} is not an integer from 0 to 2**63 - 1")

    def _check_data(self) -> None:
        """Data source, domains, device, switches."""
        if self.data_source not in DATA_SOURCES:
            raise self._bad("data_source", f"must be one of {DATA_SOURCES}")
        if self.data_source == "local" and not self.data_dir:
            raise self._bad("data_dir", "data_source='local' needs a data_dir")
        if not self.domains:
            raise self._bad("domains", "give one or more domains: Stage 1, Stage 2, ...")
        if len(set(self.domains)) != len(self.domains):
            raise self._bad("domains", "every stage needs a different domain")
        for d in self.domains:
            spec = ":" in d or Path(d).suffix.lower() in DATA_FILE_BUILDERS  # read with datasets
            if self.data_source == "builtin" and d not in BUILTIN_DOMAINS and not spec:
                raise self._bad("domains", f"unknown builtin domain {d!r}; known: {BUILTIN_DOMAINS}")
            if self.data_source == "hub" and d not in HUB_DOMAINS and not spec:
                raise self._bad("domains", f"unknown hub domain {d!r}: use one of {tuple(HUB_DOMAINS)} "
                                "or '<dataset>[@<config>]:<text column>[:<train split>[:<eval split>]]' "
                                f"(a hub id, a dataset folder or a {'/'.join(DATA_FILE_BUILDERS)} file)")
        if self.device not in DEVICES:
            raise self._bad("device", f"must be one of {DEVICES}")
        if self.report_to in (("none",), ("None",)):  # Trainer's spelling of "no tracking"
            object.__setattr__(self, "report_to", ())
        for kind in self.report_to:
            if kind not in REPORTERS:
                raise self._bad("report_to", f"{kind!r} is not one of {REPORTERS} (or 'none')")
        for name in ("keep_checkpoints", "dylora_frozen", "share_stage1", "gradient_checkpointing", "alloc_regrow"):
            if not isinstance(getattr(self, name), bool):
                raise self._bad(name, "must be True or False")

    def _check_rank_methods(self) -> None:
        """DyLoRA, DC variant, Matryoshka ranks, rank sweeps."""
        if not isinstance(self.dylora_r_min, int) or not 1 <= self.dylora_r_min <= min(self.rank_schedule):
            raise self._bad("dylora_r_min", f"must be between 1 and the lowest scheduled rank {min(self.rank_schedule)}")
        if self.dc_variant not in DC_VARIANTS:
            raise self._bad("dc_variant", f"must be one of {DC_VARIANTS}")
        if self.dylora_distribution not in DYLORA_DISTRIBUTIONS:
            raise self._bad("dylora_distribution", f"must be one of {DYLORA_DISTRIBUTIONS}")
        if not 0 < self.svd_nest_fraction <= 1:
            raise self._bad("svd_nest_fraction", "must be in (0, 1]: the share of a stage's steps trained nested")
        if self.svd_nest_mode not in SVD_NEST_MODES:
            raise self._bad("svd_nest_mode", f"must be one of {SVD_NEST_MODES}")
        if self.matryoshka_weighting not in MATRYOSHKA_WEIGHTINGS:
            raise self._bad("matryoshka_weighting", f"must be one of {MATRYOSHKA_WEIGHTINGS}")
        if not 0.0 < self.dylora_p < 1.0:
            raise self._bad("dylora_p", "must be in (0, 1)")
        if any(not isinstance(k, int) or k < 1 for k in self.sweep_ranks):
            raise self._bad("sweep_ranks", "ranks must be positive integers")
        if any(not isinstance(k, int) or not 1 <= k <= self.r for k in self.matryoshka_ranks):
            raise self._bad("matryoshka_ranks", f"ranks must be integers from 1 to r={self.r}")
        for kind in self.sweep_kinds:
            if kind not in SWEEP_KINDS:
                raise self._bad("sweep_kinds", f"unknown kind {kind!r}; known: {SWEEP_KINDS}")

    def _check_allocation(self) -> None:
        """Importance estimator and the allocation schedule."""
        if self.importance not in IMPORTANCES:
            raise self._bad("importance", f"must be one of {IMPORTANCES}")
        for name in ("alloc_tinit", "alloc_tfinal"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise self._bad(name, "must be a share of a stage's steps in [0, 1)")
        if self.alloc_tinit + self.alloc_tfinal >= 1.0:
            raise self._bad("alloc_tfinal", f"alloc_tinit + alloc_tfinal = {self.alloc_tinit + self.alloc_tfinal} "
                      "leaves no steps for the budget to fall; their sum must be below 1")
        if not isinstance(self.alloc_delta_t, int) or self.alloc_delta_t < 1:
            raise self._bad("alloc_delta_t", "must be a positive integer (steps)")
        for name in ("alloc_beta1", "alloc_beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise self._bad(name, "must be in (0, 1)")
        allocating = [m for m in self.methods if m in ALLOCATING_METHODS]
        if allocating and self.rank_schedule[-1] >= self.r:
            raise self._bad("rank_schedule", f"methods {allocating} allocate a budget of uniform rank "
                      f"rank_schedule[-1]={self.rank_schedule[-1]} out of r={self.r}: it must be below r")

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        """Inverse of `to_dict`; unknown keys (e.g. `method`, `seed`) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_overrides(self, overrides: dict[str, str]) -> "ExperimentConfig":
        """Apply `field=value` strings (from the CLI), coerced to each field's type."""
        hints = typing.get_type_hints(type(self))
        changes = {}
        for name, text in overrides.items():
            if name not in hints:
                raise ValueError(f"unknown ExperimentConfig field {name!r} in --set {name}={text}")
            changes[name] = _coerce(name, text, hints[name])
        return dataclasses.replace(self, **changes)

    def with_file(self, path: str | Path) -> "ExperimentConfig":
        """This config with the fields of a YAML (.yaml, .yml) or JSON config file on top: any
        ExperimentConfig fields, e.g. `r: 16` and `rank_schedule: [16, 8, 4]`. A run's own
        config.json is one: its `method` and `seed` become `methods` and `seeds`, so it names
        that one run. ValueError naming the file and the field for an unknown field or a value
        of the wrong type; bad values fail `validate` as with --set."""
        return dataclasses.replace(self, **file_changes(path))


def from_preset(preset: str = "paper", data_dir: str | None = None, sequence: str | None = None,
                **changes) -> ExperimentConfig:
    """The preset named `preset` with `changes`; a change whose value is None keeps the
    preset's value. A `data_dir` also switches `data_source` to "local". `sequence` (a key
    of SEQUENCES) selects the forgetting and rank_flex presets' domains; for the others it sets `domains`."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {PRESETS}")
    if sequence is not None and sequence not in SEQUENCES:
        raise ValueError(f"sequence={sequence!r}: must be one of {tuple(SEQUENCES)}")
    changes = {k: v for k, v in changes.items() if v is not None}
    if data_dir is not None:
        changes.update(data_source="local", data_dir=str(data_dir))
    if preset in ("forgetting", "rank_flex", "dynamic"):
        default = {"forgetting": "imdb-code", "rank_flex": "imdb-yelp", "dynamic": "imdb-code"}[preset]
        base = getattr(ExperimentConfig, preset)(sequence or default)
    else:
        base = getattr(ExperimentConfig, preset)()
        if sequence is not None:
            changes.setdefault("domains", SEQUENCES[sequence])
    return dataclasses.replace(base, **changes)


# keys of a run's config.json that are not ExperimentConfig fields
RUN_KEYS = ("method", "seed", "schema_version", "fingerprints")


def read_config_file(path: str | Path) -> dict:
    """{field: value} of a YAML or JSON config file; a run's config.json gives its one method
    and seed as `methods` and `seeds`. FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # PyYAML: installed with transformers

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError
        raise ValueError(f"--config {path}: not valid JSON ({err}); YAML files end in .yaml or .yml") from None
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of ExperimentConfig fields, found "
                         f"{type(data).__name__}")
    data = dict(data)
    if "method" in data:
        data["methods"] = [data.pop("method")]
    if "seed" in data:
        data["seeds"] = [data.pop("seed")]
    return {k: v for k, v in data.items() if k not in RUN_KEYS}


def file_changes(path: str | Path) -> dict:
    """The fields of the config file `path` (`read_config_file`), each coerced to its field's
    type; ValueError naming the file and the field when one is unknown or of the wrong type."""
    fields = read_config_file(path)
    hints = typing.get_type_hints(ExperimentConfig)
    unknown = sorted(set(fields) - set(hints))
    if unknown:
        raise ValueError(f"--config {path}: unknown ExperimentConfig field {unknown[0]!r}"
                         f"{_did_you_mean(unknown[0], hints)}")
    return {k: _coerce(k, _as_text(v), hints[k], f"--config {path}:") for k, v in fields.items()}


def _as_text(value) -> str:
    """A config file's value as the text --set would give (lists as JSON, None as "none")."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def _did_you_mean(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, text: str, hint, source: str | None = None) -> object:
    """Turn a CLI string into a value of type `hint` (bool, int, float, str, tuples, Optional);
    errors name `source` (default: the --set item)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:  # bool("false") is True: read the word instead
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if text.lower() not in words:
                raise ValueError(text)
            return words[text.lower()]
        if hint in (int, float, str):
            return hint(text)
        if origin is tuple:
            items = json.loads(text) if text.startswith("[") else text.split(",")
            return tuple(args[0](x) for x in items if str(x).strip() != "")
        if type(None) in args:  # Optional[X]
            if text.lower() in ("none", "null", ""):
                return None
            return _coerce(name, text, next(a for a in args if a is not type(None)), source)
    except ValueError:
        where = f"{source} {name}" if source else f"--set {name}={text}"
        raise ValueError(f"{where}: cannot read {text!r} as {hint}") from None
    raise ValueError(f"--set {name}: unsupported field type {hint}")
