"""GGUF base models: a tiny LLaMA written as a GGUF file loads back as the same fp32 model (no
quantizer state left on it), trains and resumes exactly; the real SmolLM2-135M when present."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_lora.config import ExperimentConfig
from hybrid_lora.models import build_base_model, byte_tokenizer, load_tokenizer
from hybrid_lora.results import run_dir
from hybrid_lora.runs import run_experiment

from conftest import tiny_config
from test_resume import Interrupt, count_training_steps, finished_files

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) reads GGUF files")

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m"
# transformers LLaMA names -> GGUF names (llama.cpp's convention)
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp stores q and k projections in (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tok, path: Path) -> None:
    """`model` (a transformers LLaMA) and `tok` as an fp32 GGUF file, written with the gguf package
    as llama.cpp's converter lays it out: metadata, a BPE tokenizer, tensors."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings), w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"])), w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads), w.add_vocab_size(len(tok))
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == tok.eos_token else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([]), w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(tok.bos_token_id), w.add_eos_token_id(tok.eos_token_id), w.add_pad_token_id(tok.pad_token_id)
    for name, t in model.state_dict().items():
        t = t.detach().numpy().astype(np.float32)
        if name in TOP_NAMES:
            w.add_tensor(TOP_NAMES[name], t)
            continue
        _, _, layer, *module, kind = name.split(".")  # model.layers.<i>.<module>.weight
        module = ".".join(module)
        heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}
        if module in heads:
            t = llama_cpp_permute(t, heads[module])
        w.add_tensor(f"blk.{layer}.{LAYER_NAMES[module]}.{kind}", np.ascontiguousarray(t))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(config of the original tiny LLaMA, the GGUF file of it)."""
    cfg = tiny_config(model_name="tiny-random-llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(build_base_model(cfg, 257), byte_tokenizer(), path)
    return cfg, path


def test_a_gguf_file_loads_as_the_same_plain_fp32_model(tiny_gguf, tmp_path):
    cfg, path = tiny_gguf
    original = build_base_model(cfg, 257).eval()
    loaded = build_base_model(dataclasses.replace(cfg, model_name=str(path))).eval()
    ids = byte_tokenizer()("The film was great. def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in loaded.parameters())
    assert getattr(loaded, "hf_quantizer", None) is None and not hasattr(loaded.config, "quantization_config")
    loaded.save_pretrained(tmp_path / "saved")  # refused while the GGUF quantizer tag is on it
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    again = build_base_model(dataclasses.replace(cfg, model_name=str(path)))  # a copy, not the same object
    with torch.no_grad():
        again.model.embed_tokens.weight.add_(1.0)
    fresh = build_base_model(dataclasses.replace(cfg, model_name=str(path)))
    assert torch.equal(fresh.model.embed_tokens.weight, original.model.embed_tokens.weight)
    tok = load_tokenizer(dataclasses.replace(cfg, model_name=str(path)))
    assert tok("a film", return_tensors="pt").input_ids.tolist() == byte_tokenizer()("a film", return_tensors="pt").input_ids.tolist()
    assert (tok.pad_token, tok.padding_side) == (tok.eos_token, "right")
    # a folder that holds one GGUF file (and no config.json) names it too
    assert build_base_model(dataclasses.replace(cfg, model_name=str(path.parent))).config.num_hidden_layers == 2


def test_a_run_on_a_gguf_base_resumes_exactly(tiny_gguf, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_config(lora_dropout=0.3, checkpoint_every=2), model_name=str(tiny_gguf[1]))
    run_experiment(cfg, "hybrid", 42, tmp_path / "whole", progress=False)
    count_training_steps(monkeypatch, stop_at=11)
    with pytest.raises(Interrupt):
        run_experiment(cfg, "hybrid", 42, tmp_path / "cut", progress=False)
    count_training_steps(monkeypatch)
    assert run_experiment(cfg, "hybrid", 42, tmp_path / "cut", progress=False)["complete"]
    assert finished_files(tmp_path / "cut", "hybrid") == finished_files(tmp_path / "whole", "hybrid")
    assert (run_dir(tmp_path / "cut", "hybrid", 42) / "metrics.json").exists()


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="../shared/models/smollm2-135m is absent")
def test_smollm2_135m_loads_from_its_gguf_file_as_a_pretrained_llama():
    import json

    cfg = dataclasses.replace(ExperimentConfig.smoke(), model_name=str(SMOLLM2))
    tok, base = load_tokenizer(cfg), build_base_model(cfg)
    # the figures of ../shared/models/README.md
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    assert (base.config.model_type, base.config.num_hidden_layers, len(tok), tok.eos_token_id) == ("llama", 30, 49152, 2)
    data = SMOLLM2.parents[1] / "data" / "imdb.jsonl"
    texts = [json.loads(line)["text"] for line in data.open()][:4] if data.exists() else ["The film was a delight."] * 4
    batch = tok(texts, return_tensors="pt", truncation=True, max_length=32, padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        loss = base(**batch, labels=labels).loss.item()
    # pretrained: far below a uniform guess, ln 49152 = 10.8 (wrongly ordered q/k rows would not be)
    assert 2.0 < loss < 6.0
