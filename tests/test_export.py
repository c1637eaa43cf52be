"""`export`: a run's adapter cut to rank K as a PEFT adapter (or a merged model) computes the
logits of the rank sweep's evaluation of that cut; pushing goes through the libraries' own
`push_to_hub`, with the upload mocked at the hub client."""
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from hybrid_lora.adapters import component_mask, load_adapter, load_tokenizer, lora_factors
from hybrid_lora.cli import main
from hybrid_lora.data import make_loaders
from hybrid_lora.evaluate import evaluate_loss_and_token_acc
from hybrid_lora.models import build_base_model
from hybrid_lora.ranks import slice_multiplier, svd_allocate, swapped_factors
from hybrid_lora.results import read_json, run_dir
from hybrid_lora.runs import run_experiment

from conftest import randomize_lora, tiny_config

TEXT = "The film was great, the food was cold. def f(x): return x"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished `lora` and `dylora_nested` runs (r = 8), swept at every cut and rank 2, 4."""
    out = tmp_path_factory.mktemp("export")
    cfg = tiny_config(sweep_ranks=(2, 4), sweep_kinds=("slice", "svd", "svd_alloc"), rank_schedule=(8, 8, 8),
                      target_modules=("all-linear",))
    for method in ("lora", "dylora_nested"):
        run_experiment(cfg, method, 42, out, progress=False)
    return cfg, out


def logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(tok(TEXT, return_tensors="pt").input_ids).logits


def peft_load(cfg, folder: Path):
    tok = load_tokenizer(cfg)
    return PeftModel.from_pretrained(build_base_model(cfg, vocab_size=len(tok)), str(folder)).eval(), tok


def sweep_row(run: Path, kind: str, rank: int, scaling: str) -> dict:
    rows = [r for r in read_json(run / "sweep.json") if (r["adapter"], r["domain"], r["kind"], r["rank"])
            == ("final", "B", kind, rank) and r["scaling"] == scaling]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("method, cut, scaling", [("lora", "svd", "preserve"), ("lora", "slice", "preserve"),
                                                  ("lora", "svd_alloc", "preserve"),
                                                  ("dylora_nested", "slice", "dylora")])
def test_an_exported_cut_computes_the_sweeps_evaluation_of_that_cut(runs, tmp_path, method, cut, scaling):
    cfg, out = runs
    run = run_dir(out, method, 42)
    assert main(["export", str(run), "--rank", "2", "--cut", cut, "--out", str(tmp_path / "x")]) == 0
    exported, tok = peft_load(cfg, tmp_path / "x")
    # the sweep's own mechanism on the full-rank adapter: a component mask or swapped factors
    model = load_adapter(cfg, run / "adapter_final")
    factors = [(a.detach(), b.detach()) for _, a, b, _ in lora_factors(model)]
    if cut == "slice":
        with component_mask(model) as m:
            m[2:], m[:2] = 0.0, slice_multiplier(model, 2, scaling)
            expected = logits(model, tok)
    else:
        cut_f = ([(a, b) for a, b in svd_allocate(factors, [s for *_, s in lora_factors(model)], 2)[0]]
                 if cut == "svd_alloc" else None)
        if cut == "svd":  # independent of ranks.cut_factors: rank-2 Eckart-Young of each delta W
            cut_f = []
            for a, b in factors:
                u, s, vh = torch.linalg.svd((b @ a).double())
                cut_f.append(((s[:2, None] * vh[:2]).float().contiguous(), u[:, :2].float()))
            cut_f = [(torch.cat([a2, torch.zeros(6, a2.shape[1])]), torch.cat([b2, torch.zeros(b2.shape[0], 6)], 1))
                     for a2, b2 in cut_f]
        with swapped_factors(model, cut_f):
            expected = logits(model, tok)
    torch.testing.assert_close(logits(exported, tok), expected, atol=2e-5, rtol=1e-5)
    info = read_json(tmp_path / "x" / "export.json")
    assert (info["rank"], info["adapter_rank"], info["cut"], info["scaling"]) == (2, 8, cut, scaling)
    # its loss on the evaluation texts is the sweep row's
    loader = make_loaders(cfg, tok, cfg.domains[1], 42).eval
    assert evaluate_loss_and_token_acc(exported, loader)["loss"] == pytest.approx(
        sweep_row(run, cut, 2, scaling)["loss"], abs=1e-5)
    # only the kept components are stored: rank 2 per module (svd_alloc: the allocation's ranks)
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "x" / "adapter_model.safetensors")
    kept = ({n.removeprefix("base_model.model."): k for (n, *_), k in zip(lora_factors(model), svd_allocate(
        factors, [s for *_, s in lora_factors(model)], 2)[1]) if k} if cut == "svd_alloc"
            else {n.removeprefix("base_model.model."): 2 for n, *_ in lora_factors(model)})
    assert config["rank_pattern"] == kept == {k: v for k, v in info["module_ranks"].items() if v}
    assert sum(t.numel() for t in tensors.values()) == info["lora_params"]
    if cut == "svd_alloc":
        assert len(set(kept.values())) > 1  # an allocation, not uniform rank 2


def test_the_own_rank_export_is_the_adapter_itself_and_svd_is_eckart_young(runs, tmp_path):
    cfg, out = runs
    run = run_dir(out, "lora", 42)
    main(["export", str(run), "--out", str(tmp_path / "own")])
    model = load_adapter(cfg, run / "adapter_final")
    exported, tok = peft_load(cfg, tmp_path / "own")
    assert torch.equal(logits(exported, tok), logits(model, tok))  # no cut: the same weights
    assert read_json(tmp_path / "own" / "export.json")["cut"] == "none"
    main(["export", str(run), "--rank", "3", "--out", str(tmp_path / "r3")])
    three, _ = peft_load(cfg, tmp_path / "r3")
    for (_, a, b, s), (_, a3, b3, s3) in zip(lora_factors(model), lora_factors(three)):
        assert a3.shape[0] == 3 and s3 == pytest.approx(s)  # rank 3 at the adapter's scaling
        u, sv, vh = torch.linalg.svd((b @ a).detach().double())
        torch.testing.assert_close((b3 @ a3).detach().double(), u[:, :3] * sv[:3] @ vh[:3], atol=1e-6, rtol=1e-5)
        assert torch.allclose(torch.linalg.svdvals((b3 @ a3).detach().double())[:3], sv[:3], atol=1e-6)


def test_a_merged_export_loads_with_automodel_and_its_tokenizer(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, out = runs
    run = run_dir(out, "lora", 42)
    main(["export", str(run), "--rank", "4", "--out", str(tmp_path / "a")])
    main(["export", str(run), "--rank", "4", "--merge", "--out", str(tmp_path / "m")])
    adapter, tok = peft_load(cfg, tmp_path / "a")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, tok), logits(adapter, tok), atol=2e-5, rtol=1e-5)
    saved_tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert saved_tok(TEXT).input_ids == tok(TEXT).input_ids
    assert not (tmp_path / "m" / "adapter_config.json").exists()  # else transformers would load it as an adapter


def test_a_merged_export_of_a_gguf_base_saves_and_reloads(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from test_gguf import write_gguf
    from hybrid_lora.models import byte_tokenizer

    path = tmp_path / "tiny-llama.F32.gguf"
    write_gguf(build_base_model(tiny_config(model_name="tiny-random-llama"), 257), byte_tokenizer(), path)
    cfg = tiny_config(model_name=str(path), epochs_stage2=1, rank_schedule=(8,), sweep_ranks=())
    run_experiment(cfg, "lora", 42, tmp_path / "o", progress=False)
    run = run_dir(tmp_path / "o", "lora", 42)
    main(["export", str(run), "--rank", "2", "--merge", "--out", str(tmp_path / "m")])
    main(["export", str(run), "--rank", "2", "--out", str(tmp_path / "a")])
    adapter, tok = peft_load(cfg, tmp_path / "a")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert "quantization_config" not in (tmp_path / "m" / "config.json").read_text()
    torch.testing.assert_close(logits(merged, tok), logits(adapter, tok), atol=2e-5, rtol=1e-5)


class FakeHub:
    """The hub client's create_repo / create_commit, recording what would be uploaded."""

    def __init__(self):
        self.files = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            src = op.path_or_fileobj
            self.files[(repo_id, op.path_in_repo)] = Path(src).read_bytes() if isinstance(src, (str, Path)) else src
        return None


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: hub.create_repo(repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda self, repo_id, operations, **kw: hub.create_commit(repo_id, operations, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **kw: (_ for _ in ()).throw(
        huggingface_hub.errors.RepositoryNotFoundError("mocked")), raising=False)
    return hub


@pytest.mark.parametrize("merge", [False, True])
def test_push_to_hub_uploads_the_exported_files(runs, tmp_path, fake_hub, merge):
    cfg, out = runs
    run = run_dir(out, "lora", 42)
    args = ["export", str(run), "--rank", "2", "--out", str(tmp_path / "x"), "--push-to-hub", "me/tiny-r2"]
    assert main(args + (["--merge"] if merge else [])) == 0
    names = {name for repo, name in fake_hub.files if repo == "me/tiny-r2"}
    weights = "model.safetensors" if merge else "adapter_model.safetensors"
    assert {weights, "config.json" if merge else "adapter_config.json"} <= names
    if merge:
        assert "tokenizer.json" in names
    uploaded = fake_hub.files[("me/tiny-r2", weights)]
    written = load_file(tmp_path / "x" / weights)
    from safetensors.torch import load as load_bytes

    got = load_bytes(uploaded if isinstance(uploaded, bytes) else uploaded.read())
    assert set(got) == set(written) and all(torch.equal(got[k], written[k]) for k in written)


def test_export_errors_name_the_bad_value(runs, tmp_path, capsys):
    cfg, out = runs
    run = run_dir(out, "lora", 42)
    assert main(["export", str(run), "--rank", "9", "--out", str(tmp_path / "x")]) == 2
    assert "--rank 9: must be between 1 and the adapter's rank 8" in capsys.readouterr().err
    assert main(["export", str(run), "--adapter", "stage3", "--out", str(tmp_path / "x")]) == 2
    assert "['final', 'stage1']" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert "holds files of something else" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "no config.json there" in capsys.readouterr().err
    main(["export", str(run), "--out", str(tmp_path / "again")])
    assert main(["export", str(run), "--rank", "2", "--out", str(tmp_path / "again")]) == 0  # an export is replaced
    assert read_json(tmp_path / "again" / "export.json")["rank"] == 2


def test_a_freeze_and_add_final_adapter_is_not_exported_alone(tmp_path, capsys):
    cfg = tiny_config(epochs_stage2=1, rank_schedule=(8,), sweep_ranks=())
    run_experiment(cfg, "freeze_add", 42, tmp_path, progress=False)
    run = run_dir(tmp_path, "freeze_add", 42)
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "alone it is not the run's model" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", str(run), "--adapter", "stage1", "--out", str(tmp_path / "s1")]) == 0
