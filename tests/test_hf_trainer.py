"""Our loss terms inside transformers' Trainer and TRL's SFTTrainer: one step's reported loss is
CE + lambda * term computed by the pure functions of `losses` on the same batch (fp32), the
terms are logged by the trainer, and a two-stage run through Trainer gives our loop's adapters."""
import copy

import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainingArguments

from hybrid_lora.adapters import build_model, flatten_factors, load_adapter, lora_factors
from hybrid_lora.continual import fisher_diagonal
from hybrid_lora.data import EpochSampler, make_loaders
from hybrid_lora.hf_trainer import LossTerms, reference_after, regularized
from hybrid_lora.losses import (causal_lm_sums, dc_delta_w, delta_w_l2, domain_correlation_loss, olora_penalty,
                                ordering_penalty)
from hybrid_lora.results import run_dir
from hybrid_lora.runs import run_experiment
from hybrid_lora.train import set_seed

from conftest import randomize_lora, tiny_config


class Rows(Dataset):
    """A TensorDataset of (input_ids, attention_mask, labels) as the dicts a Trainer collates,
    in the order `order` (our loop's epoch order when given)."""

    def __init__(self, tensors, order=None):
        self.tensors, self.order = tensors, list(range(len(tensors))) if order is None else list(order)

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        ids, mask, labels = self.tensors[self.order[i]]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def in_order(trainer_cls):
    """`trainer_cls` reading its dataset in order (the test fixes the batches) and recording them."""
    class InOrder(trainer_cls):
        batches = []

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                type(self).batches.append({k: v.clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)
    return InOrder


def args(tmp_path, cfg, **changes):
    """Our loop's optimizer: AdamW at cfg.lr and weight decay, constant rate, no clipping."""
    return TrainingArguments(**{**dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=cfg.batch_size,
                                       learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="constant",
                                       warmup_steps=0, max_grad_norm=0.0, logging_steps=1, report_to="none",
                                       use_cpu=True, save_strategy="no", seed=0), **changes})


CFG = dict(model_name="tiny-random-llama", lora_dropout=0.0,  # LLaMA: no dropout in the base either
           lambda_dc=0.7, lambda_l2=3.0, lambda_ewc=50.0, lambda_olora=0.4, lambda_order=0.2,
           ewc_samples=4)


def expected_terms(method, cfg, factors, prev, scalings, prev_scalings, fisher=None, old_a=None) -> float:
    """The method's weighted terms from the pure loss functions at `factors` (no LossTerms)."""
    if method == "dc":
        return domain_correlation_loss(flatten_factors(prev), flatten_factors(factors), cfg.lambda_dc).item()
    if method == "dc_delta_w":
        return dc_delta_w(factors, prev, cfg.lambda_dc).item()
    if method == "l2":
        return cfg.lambda_l2 * delta_w_l2(factors, prev, scalings, prev_scalings).item()
    if method == "ewc":
        flat = [t for ab in factors for t in ab]
        anchors = [t for ab in prev for t in ab]
        return cfg.lambda_ewc * sum((f * (t - t0).square()).sum() for t, t0, f in zip(flat, anchors, fisher)).item()
    if method == "olora":
        return cfg.lambda_olora * olora_penalty([a for a, _ in factors], old_a).item()
    return cfg.lambda_order * ordering_penalty(factors).item()  # dylora: the ordering term


@pytest.mark.parametrize("method", ["dc", "dc_delta_w", "l2", "ewc", "olora", "dylora"])
def test_one_trainer_step_reports_ce_plus_the_weighted_term(tmp_path, method):
    cfg = tiny_config(**CFG, dc_variant="delta_w" if method == "dc_delta_w" else "global")
    name = "dc" if method == "dc_delta_w" else method
    set_seed(0)
    stage1, tok = build_model(cfg)
    randomize_lora(stage1, seed=1, scale=0.3)
    model = copy.deepcopy(stage1)
    randomize_lora(model, seed=2, scale=0.3)
    data = make_loaders(cfg, tok, "yelp", 42).train.dataset
    earlier = make_loaders(cfg, tok, "imdb", 42).train.dataset
    reference = reference_after(cfg, name, [stage1], [earlier])
    before = copy.deepcopy(model)
    trainer_cls = in_order(regularized(Trainer))
    trainer_cls.batches = []
    trainer = trainer_cls(model=model, args=args(tmp_path, cfg, max_steps=1), train_dataset=Rows(data),
                          loss_terms=LossTerms(cfg, name, model, reference))
    trainer.train()
    batch = trainer_cls.batches[0]
    with torch.no_grad():
        ce, n, _ = causal_lm_sums(before(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"], with_hits=False)
    factors = [(a.detach(), b.detach()) for _, a, b, _ in lora_factors(before)]
    prev = [(a.detach(), b.detach()) for _, a, b, _ in lora_factors(stage1)]
    scalings = [s for *_, s in lora_factors(before)]
    fisher = fisher_diagonal(copy.deepcopy(stage1).requires_grad_(True), earlier, cfg.ewc_samples) if name == "ewc" else None
    term = expected_terms(method, cfg, factors, prev, scalings, scalings, fisher, [a for a, _ in prev])
    logged = trainer.state.log_history[0]
    assert term > 1e-4  # the term acts here
    assert logged["loss"] == pytest.approx((ce / n).item() + term, rel=1e-6)
    key = {"dc": "dc", "dc_delta_w": "dc", "dylora": "order"}.get(method, "penalty")
    assert logged[key] == pytest.approx(term, rel=1e-6)


def test_terms_count_once_per_step_under_gradient_accumulation(tmp_path):
    cfg = tiny_config(**CFG)
    set_seed(0)
    stage1, tok = build_model(cfg)
    randomize_lora(stage1, seed=1, scale=0.3)
    data = make_loaders(cfg, tok, "yelp", 42).train.dataset
    losses = []
    for accumulate in (1, 2):
        model = copy.deepcopy(stage1)
        randomize_lora(model, seed=2, scale=0.3)
        trainer = in_order(regularized(Trainer))(
            model=model, args=args(tmp_path, cfg, max_steps=1, gradient_accumulation_steps=accumulate,
                                   per_device_train_batch_size=cfg.batch_size // accumulate),
            train_dataset=Rows(data), loss_terms=LossTerms(cfg, "dc", model, reference_after(cfg, "dc", [stage1])))
        trainer.train()
        losses.append((trainer.state.log_history[0]["loss"], trainer.state.log_history[0]["dc"],
                       [p.detach().clone() for _, p in model.named_parameters() if p.requires_grad]))
    (l1, dc1, w1), (l2, dc2, w2) = losses
    assert dc1 == pytest.approx(dc2, rel=1e-6) and l1 == pytest.approx(l2, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w1, w2))


def test_a_method_that_needs_a_reference_says_so():
    cfg = tiny_config(**CFG)
    model, _ = build_model(cfg)
    with pytest.raises(ValueError, match="give reference=reference_after"):
        LossTerms(cfg, "l2", model)
    with pytest.raises(ValueError, match="EWC's Fisher needs each earlier stage's training sequences"):
        reference_after(cfg, "ewc", [model])
    assert LossTerms(cfg, "lora", model)() == {}


STAGE2_TOLERANCE = 1e-1


@pytest.mark.parametrize("method", ["dc", "l2"])
def test_a_two_stage_run_through_trainer_gives_our_loops_adapters(tmp_path, method):
    cfg = tiny_config(**CFG, epochs_stage1=1, epochs_stage2=1, rank_schedule=(8,), sweep_ranks=())
    run_experiment(cfg, method, 42, tmp_path / "ours", progress=False)
    rd = run_dir(tmp_path / "ours", method, 42)
    set_seed(42)  # what run_experiment does before building the model
    model, tok = build_model(cfg)
    sets = [make_loaders(cfg, tok, d, 42).train.dataset for d in cfg.domains]

    def order(stage):  # our loop's batches: EpochSampler(seed) of (stage, epoch 1)
        sampler = EpochSampler(len(sets[stage - 1]), 42)
        sampler.set_epoch(stage, 1)
        return list(sampler)

    trainer_cls = in_order(regularized(Trainer))
    stage_args = args(tmp_path, cfg, num_train_epochs=1)
    trainer_cls(model=model, args=stage_args, train_dataset=Rows(sets[0], order(1))).train()
    ours1 = load_adapter(cfg, rd / "adapter_stage1")
    assert_same_adapter(model, ours1)
    plain = copy.deepcopy(model)
    terms = LossTerms(cfg, method, model, reference_after(cfg, method, [model]))
    trainer_cls(model=model, args=stage_args, train_dataset=Rows(sets[1], order(2)), loss_terms=terms).train()
    ours = load_adapter(cfg, rd / "adapter_final")
    # Stage 2 starts from weights that already carry Stage 1's rounding: one module of the L2
    # run ended at 7.8e-3 of its movement on one machine, 4.3e-2 on an AMD EPYC (1e-6 to 7e-4 elsewhere)
    assert_same_adapter(model, ours, ours1, tolerance=STAGE2_TOLERANCE)
    # the power of that check: Stage 2 without the term fails it (measured: modules at 0.037 to 5.5)
    trainer_cls(model=plain, args=stage_args, train_dataset=Rows(sets[1], order(2))).train()
    with pytest.raises(AssertionError):
        assert_same_adapter(plain, ours, ours1, tolerance=STAGE2_TOLERANCE)


def assert_same_adapter(model, ours, start=None, tolerance: float = 1e-3) -> None:
    """Every module's delta W equal to ours within `tolerance` of how far training moved it (from
    `start`'s; Stage 1 starts at delta W = 0, B being 0). Adam moves each weight by about lr
    whatever its gradient's size, so the few weights whose gradient is near zero carry the float
    rounding of the summed loss: elementwise they differ by up to 4e-5 here (1 of 512 weights),
    1.3e-4 of the movement in norm."""
    starts = lora_factors(start) if start is not None else [None] * len(lora_factors(ours))
    for (_, a, b, s), (_, a2, b2, _), first in zip(lora_factors(model), lora_factors(ours), starts):
        theirs, mine = s * (b @ a).detach(), s * (b2 @ a2)
        moved = mine - first[3] * (first[2] @ first[1]) if first is not None else mine
        assert torch.linalg.norm(theirs - mine) <= tolerance * torch.linalg.norm(moved)


def test_sft_trainer_reports_its_loss_plus_dc(tmp_path):
    trl = pytest.importorskip("trl", reason="trl (pip install trl) gives SFTTrainer")
    from datasets import Dataset as HFDataset

    cfg = tiny_config(**CFG)
    set_seed(0)
    stage1, tok = build_model(cfg)
    randomize_lora(stage1, seed=1, scale=0.3)
    start = copy.deepcopy(stage1)
    randomize_lora(start, seed=2, scale=0.3)
    texts = HFDataset.from_dict({"text": [f"The waiter number {i} was friendly and the soup was hot." for i in range(8)]})
    sft_args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=cfg.lr, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             max_length=48, packing=False, lr_scheduler_type="constant", max_grad_norm=0.0)
    logged, batches = [], []
    for with_dc in (False, True):
        model = copy.deepcopy(start)
        trainer_cls = in_order(regularized(trl.SFTTrainer))
        trainer_cls.batches = []
        terms = LossTerms(cfg, "dc", model, reference_after(cfg, "dc", [stage1])) if with_dc else None
        trainer = trainer_cls(model=model, args=sft_args, train_dataset=texts, processing_class=tok, loss_terms=terms)
        trainer.train()
        logged.append(trainer.state.log_history[0])
        batches.append(trainer_cls.batches[0])
    assert all(torch.equal(batches[0][k], batches[1][k]) for k in batches[0])
    dc = domain_correlation_loss(flatten_factors([(a.detach(), b.detach()) for _, a, b, _ in lora_factors(stage1)]),
                                 flatten_factors([(a.detach(), b.detach()) for _, a, b, _ in lora_factors(start)]),
                                 cfg.lambda_dc).item()
    assert dc > 1e-4 and logged[1]["dc"] == pytest.approx(dc, rel=1e-6)
    assert logged[1]["loss"] == pytest.approx(logged[0]["loss"] + dc, rel=1e-6)
    # SFTTrainer's own CE (its fused LM head's log-probabilities) is within 1e-3 of a plain log-softmax CE
    with torch.no_grad():
        b = batches[0]
        ce, n, _ = causal_lm_sums(start(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"], with_hits=False)
    assert logged[0]["loss"] == pytest.approx((ce / n).item(), rel=1e-3)


def test_the_example_of_docs_trainer_md_runs(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/trainer.md", "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out
    assert "'dc':" in printed and "'loss':" in printed
