"""Budgeted rank allocation (methods dynamic, dynamic_protect): importance estimators against
slow per-weight references, the budget never exceeded, masked components contributing nothing,
the compact adapter reloading with its per-module ranks."""
import dataclasses
import math

import pytest
import torch
from peft import PeftModel

from hybrid_lora import build_model, run_experiment
from hybrid_lora.adapters import build_base_model, load_tokenizer, lora_factors
from hybrid_lora.allocation import Allocator, budget_at, mask_to_budget, moment_variance, target_rank
from hybrid_lora.allocation.importance import Importance
from hybrid_lora.results import read_json, run_dir

from conftest import randomize_lora, tiny_config


def all_linear(**changes):
    """Tiny GPT-2 with LoRA on all four linear layers of each block (modules of unequal cost)."""
    return tiny_config(**{"target_modules": ("all-linear",), "methods": ("dynamic",), **changes})


def test_mask_to_budget_against_a_slow_greedy_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n_mod, r = 3, 5
        scores = [torch.rand(r, generator=g) for _ in range(n_mod)]
        costs = [int(c) for c in torch.randint(1, 9, (n_mod,), generator=g)]
        fixed = [torch.rand(r, generator=g) < 0.2 for _ in range(n_mod)] if trial % 2 else None
        budget = int(torch.randint(0, 60, (), generator=g))
        masks = mask_to_budget(scores, costs, budget, fixed)
        # slow: walk the free components from the best score down, stop at the first that does not fit
        free = [(float(scores[m][i]), m, i) for m in range(n_mod) for i in range(r)
                if fixed is None or not fixed[m][i]]
        kept, spent = set(), 0
        for _, m, i in sorted(free, key=lambda x: -x[0]):
            if spent + costs[m] > budget:
                break
            kept.add((m, i))
            spent += costs[m]
        expected = [[(m, i) in kept or (fixed is not None and bool(fixed[m][i])) for i in range(r)]
                    for m in range(n_mod)]
        assert [mk.tolist() for mk in masks] == expected
        used = sum(costs[m] for m, i in kept)
        assert used <= budget


def test_budget_schedule_is_adalora_cubic_and_ends_at_the_target():
    total, t_init, t_final, b0, bt = 100, 10, 20, 1000, 200
    for t in range(1, total + 1):
        budget, remask = budget_at(t, total, t_init, t_final, b0, bt, 5)
        if t <= t_init:
            assert (budget, remask) == (b0, False)
        elif t < total - t_final:
            assert budget == int(bt + (b0 - bt) * (1 - (t - 10) / 70) ** 3)
            assert remask == ((t - 10) % 5 == 0)
        else:
            assert budget == bt and remask == (t == total - t_final)


def test_importance_averages_against_a_per_weight_loop():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, generator=g), torch.randn(5, 3, generator=g)
    imp = Importance([(a, b)], [0.5], beta1=0.8, beta2=0.7)
    grads = [(torch.randn(3, 4, generator=g), torch.randn(5, 3, generator=g)) for _ in range(3)]
    ipt = {(p, (i, j)): 0.0 for p, t in (("a", a), ("b", b))
           for i in range(t.shape[0]) for j in range(t.shape[1])}
    unc, fisher, var = dict.fromkeys(ipt, 0.0), [0.0] * 3, 0.0
    for step, (ga, gb) in enumerate(grads):
        a.grad, b.grad = ga, gb
        v = torch.tensor([0.1 * (step + 1)])
        imp.observe(v)
        for (p, (i, j)) in ipt:
            w, gr = (a, ga) if p == "a" else (b, gb)
            now = abs(float(w[i, j]) * float(gr[i, j]))
            ipt[p, (i, j)] = 0.8 * ipt[p, (i, j)] + 0.2 * now
            unc[p, (i, j)] = 0.7 * unc[p, (i, j)] + 0.3 * abs(now - ipt[p, (i, j)])
        for c in range(3):
            sq = sum(float(ga[c, j]) ** 2 for j in range(4)) / 4 + sum(float(gb[i, c]) ** 2 for i in range(5)) / 5
            fisher[c] = 0.8 * fisher[c] + 0.2 * sq
        var = 0.8 * var + 0.2 * float(v)
    sens = [sum(ipt["a", (c, j)] * unc["a", (c, j)] for j in range(4)) / 4
            + sum(ipt["b", (i, c)] * unc["b", (i, c)] for i in range(5)) / 5 for c in range(3)]
    act = [var * 0.25 * float(a[c].square().sum()) * float(b[:, c].square().sum()) for c in range(3)]
    assert imp.scores("sensitivity")[0].tolist() == pytest.approx(sens, rel=1e-5)
    assert imp.scores("fisher")[0].tolist() == pytest.approx(fisher, rel=1e-5)
    assert imp.scores("activation")[0].tolist() == pytest.approx(act, rel=1e-5)


def test_input_variance_is_the_whole_step_s_however_the_batch_is_split():
    """The allocator sums the input moments over micro-batches (and processes) before taking
    the variance: a batch fed whole or in two halves gives the same, equal to a slow loop."""
    cfg = all_linear(lora_dropout=0.0)
    model, _ = build_model(cfg)
    model.train()  # (the allocator watches training steps) without the base's dropout
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    alloc = Allocator(model, cfg, total=10)
    seen = []
    first = model.get_submodule(alloc.names[0].join(["base_model.model.", ""]))
    hook = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    ids = torch.randint(1, 257, (4, 16), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids)
    whole = [float(moment_variance(m)) for m in alloc.moments]
    for m in alloc.moments:
        m.zero_()
    model(input_ids=ids[:2]), model(input_ids=ids[2:])
    halves = [float(moment_variance(m)) for m in alloc.moments]
    assert halves == pytest.approx(whole, rel=1e-5)
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()  # [positions, in] of the whole batch
    slow = sum(x[:, f].var(unbiased=False) for f in range(x.shape[1])) / x.shape[1]
    assert whole[0] == pytest.approx(float(slow), rel=1e-5)
    hook.remove(), alloc.close()


def test_masked_components_contribute_nothing_and_keep_their_weights():
    cfg = all_linear(lora_dropout=0.0)
    model, _ = build_model(cfg)
    randomize_lora(model, scale=0.3)
    alloc = Allocator(model, cfg, total=10)
    g = torch.Generator().manual_seed(4)
    alloc.masks = [torch.rand(cfg.r, generator=g) < 0.5 for _ in alloc.masks]
    alloc._sync()
    with torch.no_grad():
        for (name, a, b, s), m in zip(lora_factors(model), alloc.masks):
            mod = model.get_submodule(name)
            xin = torch.randn(3, a.shape[1], generator=g)
            kept = sum((s * xin @ a[i:i + 1].T @ b[:, i:i + 1].T for i in range(cfg.r) if m[i]),
                       torch.zeros(3, b.shape[0]))
            torch.testing.assert_close(mod(xin), mod.base_layer(xin) + kept, atol=1e-5, rtol=1e-5)
    # one optimizer step: masked components end exactly where they started
    before = [(a.detach().clone(), b.detach().clone()) for _, a, b, _ in lora_factors(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    alloc.before_step()
    ids = torch.randint(1, 257, (2, 16), generator=g)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    alloc.observe()
    opt.step()
    alloc.after_step()
    for (_, a, b, _), (a0, b0), m in zip(lora_factors(model), before, alloc.masks):
        assert torch.equal(a[~m], a0[~m]) and torch.equal(b[:, ~m], b0[:, ~m])
        assert not torch.equal(a[m], a0[m])  # the kept ones trained
    alloc.close()


@pytest.mark.parametrize("regrow", [True, False])
def test_a_component_masked_early_comes_back_when_its_importance_rises(regrow):
    """Component 3 of every module is masked first; then a loss that only component 3's output
    direction carries (B's column 3 made large) is trained on. Under alloc_regrow its A row gets
    the gradient it would get unmasked (the forward pass stays the masked one, and B gets none),
    so its Fisher score rises and the next re-allocation keeps it; with a plain 0 multiplier it
    gets no gradient, scores 0 and stays masked (so the test can tell the two apart)."""
    cfg = all_linear(lora_dropout=0.0, importance="fisher", alloc_beta1=0.5, alloc_regrow=regrow)
    model, _ = build_model(cfg)
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    randomize_lora(model, scale=0.1)
    with torch.no_grad():
        for _, a, b, _ in lora_factors(model):
            b[:, 3] *= 50.0
    alloc = Allocator(model, cfg, total=10)
    alloc.masks = [torch.tensor([True, True, True, False] + [True] * (cfg.r - 4)) for _ in alloc.masks]
    alloc._sync()
    captured = []
    hooks = [model.get_submodule(n).lora_B["default"].register_forward_hook(
        lambda _m, _i, out: captured.append(out)) for n, *_ in lora_factors(model)]
    ids = torch.randint(1, 257, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        masked_out = model(input_ids=ids).logits
    captured.clear()
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, masked_out)  # the forward pass is the masked one either way
    loss = sum((out * b[:, 3].detach()).sum() for out, (_, _, b, _) in zip(captured, lora_factors(model)))
    loss.backward()
    for _, a, b, _ in lora_factors(model):
        assert (a.grad[3].abs().sum() > 0) == regrow and b.grad[:, 3].abs().sum() == 0
    alloc.observe()
    scores = alloc.importance.scores("fisher")
    budget = sum(c * (cfg.r - 1) for c in alloc.costs)  # room for all but one component per module
    kept = mask_to_budget(scores, alloc.costs, budget)
    assert all(bool(m[3]) == regrow for m in kept)
    for h in hooks:
        h.remove()
    alloc.close()


@pytest.fixture(scope="module")
def dynamic_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic")
    cfg = all_linear(methods=("dynamic", "dynamic_protect", "adalora"), rank_schedule=(4, 4, 4), alloc_delta_t=2)
    for method in cfg.methods:
        run_experiment(cfg, method, 42, out, progress=False)
    run_experiment(dataclasses.replace(cfg, alloc_regrow=True), "dynamic", 42, out, progress=False,
                   name="dynamic_regrow")
    return cfg, out


@pytest.mark.parametrize("method", ["dynamic", "dynamic_protect", "dynamic_regrow"])
def test_the_budget_is_never_exceeded_and_the_final_ranks_are_saved(dynamic_runs, method):
    cfg, out = dynamic_runs
    rd = run_dir(out, method, 42)
    alloc = read_json(rd / "allocation.json")
    costs = alloc["costs"]
    b_target = sum(c * target_rank(cfg) for c in costs)
    assert len(alloc["epochs"]) == cfg.epochs_stage1 + cfg.epochs_stage2
    for e in alloc["epochs"]:
        assert e["params"] <= e["budget"]
        assert len(e["ranks"]) == len(alloc["modules"]) == 8  # 2 blocks x 4 linear layers
    for stage in (1, 2):
        last = [e for e in alloc["epochs"] if e["stage"] == stage][-1]
        assert last["budget"] == b_target and last["params"] <= b_target
        # the saved adapter holds exactly the kept components
        saved = [(a.abs().sum(1) > 0).sum().item() for _, a, _, _ in lora_factors(
            PeftModel.from_pretrained(build_base_model(cfg, 257), rd / ("adapter_stage1" if stage == 1 else "adapter_final")))]
        assert saved == last["ranks"]
    assert "allocation" not in read_json(rd / "history.json")[0]


@pytest.mark.parametrize("method", ["dynamic", "dynamic_protect", "adalora"])
def test_the_allocated_adapter_reloads_with_its_per_module_ranks(dynamic_runs, method):
    cfg, out = dynamic_runs
    rd = run_dir(out, method, 42)
    ranks = read_json(rd / "allocation.json")["epochs"][-1]["ranks"]
    tok = load_tokenizer(cfg)
    full = PeftModel.from_pretrained(build_base_model(cfg, len(tok)), rd / "adapter_final").eval()
    compact = PeftModel.from_pretrained(build_base_model(cfg, len(tok)), rd / "allocated_final").eval()
    by_name = {n.removeprefix("base_model.model."): a.shape[0] for n, a, _, _ in lora_factors(compact)}
    names = read_json(rd / "allocation.json")["modules"]
    assert [by_name.get(n, 0) for n in names] == ranks
    if method == "dynamic":  # (protect keeps Stage 1's budget and adds Stage 2's)
        assert sum(by_name.values()) < cfg.r * len(names)
    if method == "adalora":  # PEFT's budget: target_r components per module on average
        assert sum(ranks) == target_rank(cfg) * len(names)
    ids = torch.randint(1, 257, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(compact(input_ids=ids).logits, full(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_protect_freezes_what_stage1_kept_and_trains_the_revived(dynamic_runs):
    cfg, out = dynamic_runs
    rd = run_dir(out, "dynamic_protect", 42)
    assert read_json(rd / "stage1.json")["copied_from"] == "dynamic/seed42"  # the same Stage 1
    assert (rd / "allocated_stage1" / "adapter_config.json").exists()
    tok = load_tokenizer(cfg)
    s1, fin = (lora_factors(PeftModel.from_pretrained(build_base_model(cfg, len(tok)), rd / d))
               for d in ("adapter_stage1", "adapter_final"))
    trained = 0
    for (_, a1, b1, _), (_, a2, b2, _) in zip(s1, fin):
        kept1 = (a1.abs().sum(1) > 0)
        assert torch.equal(a2[kept1], a1[kept1]) and torch.equal(b2[:, kept1], b1[:, kept1])
        trained += int((b2[:, ~kept1].abs().sum(0) > 0).sum())
    assert trained > 0
    last = read_json(rd / "allocation.json")["epochs"][-1]
    assert last["frozen_params"] == read_json(rd / "allocation.json")["epochs"][cfg.epochs_stage1 - 1]["params"]


def test_allocation_settings_are_checked():
    with pytest.raises(ValueError, match="importance='grad'"):
        all_linear(importance="grad")
    with pytest.raises(ValueError, match=r"rank_schedule.*\['dynamic'\].*below r"):
        all_linear(rank_schedule=(8, 8, 8))
    with pytest.raises(ValueError, match="alloc_tfinal.*below 1"):
        all_linear(alloc_tinit=0.5, alloc_tfinal=0.5)
    assert math.isclose(all_linear().alloc_beta1, 0.85)


def test_our_adalora_loss_is_peft_s_labels_loss():
    """The train loop adds AdaLoRA's orthogonality penalty itself: CE + w * penalty must equal
    the loss PEFT's AdaLoraModel.forward returns with labels."""
    from hybrid_lora.losses import causal_lm_sums, orthogonality_penalty

    cfg = all_linear(methods=("adalora",), orth_reg_weight=0.3, lora_dropout=0.0)
    model, _ = build_model(cfg, adalora=True)
    ids = torch.randint(1, 257, (2, 16), generator=torch.Generator().manual_seed(6))
    out = model(input_ids=ids, labels=ids)
    ce, n, _ = causal_lm_sums(out.logits, ids, with_hits=False)
    ours = ce / n + 0.3 * orthogonality_penalty([(a, b) for _, a, b, _ in lora_factors(model)])
    torch.testing.assert_close(ours, out.loss, atol=1e-6, rtol=1e-6)



def test_svd_allocation_against_dense_svds():
    """One global threshold on the singular values of every module's dense delta W, kept while
    the parameters of uniform rank k last; each module's cut is its best approximation at its rank."""
    from hybrid_lora.ranks import svd_allocate

    g = torch.Generator().manual_seed(7)
    shapes = [(6, 10, 4), (6, 5, 7), (6, 12, 12)]  # (r, in, out): unequal costs
    factors = [(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g) * (m + 1))
               for m, (r, i, o) in enumerate(shapes)]
    scalings = [0.5, 0.5, 0.5]
    for k in (1, 2, 4):
        cut, kept = svd_allocate(factors, scalings, k)
        dense = [s * b @ a for (a, b), s in zip(factors, scalings)]
        values = sorted(((float(v), m) for m, w in enumerate(dense)
                         for v in torch.linalg.svdvals(w.double())[:shapes[m][0]]), reverse=True)
        costs = [i + o for _, i, o in shapes]
        slow, spent = [0, 0, 0], 0
        for _, m in values:
            if spent + costs[m] > k * sum(costs):
                break
            slow[m] += 1
            spent += costs[m]
        assert kept == slow
        for (a, b), w, s, n in zip(cut, dense, scalings, kept):
            u, sv, vh = torch.linalg.svd(w.double())
            best = (u[:, :n] * sv[:n]) @ vh[:n]
            torch.testing.assert_close((s * b @ a).double(), best, atol=1e-4, rtol=1e-4)
