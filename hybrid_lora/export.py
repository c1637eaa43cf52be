"""Export a run's adapter cut to any rank, for use outside this package.

`export_run` writes a PEFT adapter folder (`PeftModel.from_pretrained(base, folder)` loads it;
per-module `rank_pattern` and `alpha_pattern`, so an allocated or `svd_alloc` cut keeps each
module's own rank), or with `merge=True` a full model (`merge_and_unload`) that
`AutoModelForCausalLM.from_pretrained(folder)` loads with its tokenizer. The cut is the one the
rank sweep evaluates (`ranks.cut_factors`), so the exported model computes the logits of that
sweep row. `push_to_hub` then calls PEFT's / transformers' own `push_to_hub`. Beside the files,
`export.json` says what was cut from where.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from .adapters import is_adalora, load_adapter, load_tokenizer, lora_factors, rng_isolated
from .allocation import save_allocated
from .checkpoint import write_dir_atomic
from .config import SWEEP_KINDS, ExperimentConfig
from .methods import get_method
from .models import build_base_model
from .ranks import cut_factors, slice_multiplier
from .results import read_json, write_json_atomic

EXPORT_FILE = "export.json"
EXPORT_SCHEMA = 1
CUTS = SWEEP_KINDS  # "slice", "svd", "svd_alloc": the rank sweep's kinds


def run_adapters(run: Path) -> list[str]:
    """The adapters a run folder holds, by the names `--adapter` takes ("stage1", ..., "final")."""
    return sorted(p.name.removeprefix("adapter_") for p in run.glob("adapter_*") if p.is_dir())


def check_out(out: Path) -> None:
    """FileExistsError when `out` is a folder with files that no earlier export wrote."""
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise FileExistsError(f"--out {out}: the folder exists and holds files of something else; "
                              "give a new or empty folder (an earlier export there is replaced)")


def cut_model(model, k: int, cut: str, scaling: str) -> None:
    """Cut `model`'s LoRA factors to rank k in place (`ranks.cut_factors`)."""
    factors = [(a.detach(), b.detach()) for _, a, b, _ in lora_factors(model)]
    scalings = [s for *_, s in lora_factors(model)]
    multiplier = slice_multiplier(model, k, scaling) if cut == "slice" else 1.0
    new = cut_factors(factors, scalings, k, cut, multiplier)
    with torch.no_grad():
        for (_, a, b, _), (a_new, b_new) in zip(lora_factors(model), new):
            a.copy_(a_new)
            b.copy_(b_new)


def _save_merged(cfg: ExperimentConfig, adapter: Path, tok, out: Path) -> None:
    """The base model with `adapter` merged in (`merge_and_unload`) and the tokenizer, saved to `out`."""
    from peft import PeftModel

    with rng_isolated():
        model = PeftModel.from_pretrained(build_base_model(cfg, vocab_size=len(tok)), str(adapter))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def push(cfg: ExperimentConfig, out: Path, repo: str, merged: bool, private: bool = False) -> None:
    """Upload the export in `out` to the hub repo `repo` with the libraries' own `push_to_hub`."""
    if merged:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(str(out)).push_to_hub(repo, private=private)
        AutoTokenizer.from_pretrained(str(out)).push_to_hub(repo, private=private)
        return
    from peft import PeftModel

    tok = load_tokenizer(cfg)
    with rng_isolated():
        model = PeftModel.from_pretrained(build_base_model(cfg, vocab_size=len(tok)), str(out))
    model.push_to_hub(repo, private=private)


def export_run(run, out, adapter: str = "final", rank: int | None = None, cut: str = "svd",
               scaling: str = "method", merge: bool = False, push_to_hub: str | None = None,
               private: bool = False) -> dict:
    """Write run folder `run`'s adapter `adapter` ("final", "stage1", ...) cut to `rank` (default:
    its own, uncut) by `cut` (CUTS) to `out`: a PEFT adapter, or with `merge` a full model; with
    `push_to_hub` ("org/name") also upload it. `scaling` of a slice: "method" (the one the method
    trains with), "preserve" or "dylora". Returns what `export.json` holds."""
    run, out = Path(run), Path(out)
    if cut not in CUTS:
        raise ValueError(f"cut={cut!r}: must be one of {CUTS}")
    saved = read_json(run / "config.json")
    cfg, method = ExperimentConfig.from_dict(saved), get_method(saved["method"])
    cfg = dataclasses.replace(cfg, device="cpu")
    path = run / f"adapter_{adapter}"
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: {path} is not there; this run has "
                                f"{run_adapters(run) or 'no adapter yet (has it finished a stage?)'}")
    if method.adapter == "add" and adapter != "stage1":
        raise ValueError(f"method {method.name}: {path} is trained on the base with the earlier stages' "
                         "adapters merged in, so alone it is not the run's model; export --adapter stage1, "
                         "or use the run's adapters in order (merge each into the base)")
    check_out(out)
    model = load_adapter(cfg, path)
    if is_adalora(model):
        raise ValueError(f"{path} is PEFT's AdaLoRA adapter (method {method.name}): load it with "
                         "PeftModel.from_pretrained as it is; export cuts LoRA adapters")
    r = max(a.shape[0] for _, a, _, _ in lora_factors(model))
    k = r if rank is None else rank
    if not 1 <= k <= r:
        raise ValueError(f"--rank {k}: must be between 1 and the adapter's rank {r}")
    scaling = method.cut_scaling(cfg) if scaling == "method" else scaling
    if k < r or cut == "svd_alloc":
        cut_model(model, k, cut, scaling)
    tok = load_tokenizer(cfg)

    def write(tmp: Path) -> None:
        if not merge:
            save_allocated(model, tmp)
            return
        with tempfile.TemporaryDirectory() as adapter_tmp:
            _save_merged(cfg, save_allocated(model, Path(adapter_tmp) / "adapter"), tok, tmp)

    live = [((a != 0).any(1) | (b != 0).any(0)) for _, a, b, _ in lora_factors(model)]  # as save_allocated
    if not any(m.any() for m in live):
        raise ValueError(f"{path}: every LoRA component is zero after the cut; nothing to export")
    write_dir_atomic(out, write)
    modules = {name.removeprefix("base_model.model."): int(m.sum())
               for (name, *_), m in zip(lora_factors(model), live)}
    info = {"schema": EXPORT_SCHEMA, "run": str(run), "method": method.name, "seed": saved.get("seed"),
            "model_name": cfg.model_name, "adapter": adapter, "adapter_rank": r, "rank": k,
            "cut": cut if k < r or cut == "svd_alloc" else "none",
            "scaling": scaling if cut == "slice" else "preserve", "merged": merge, "module_ranks": modules,
            "lora_params": sum(int(m.sum()) * (a.shape[1] + b.shape[0])
                               for (_, a, b, _), m in zip(lora_factors(model), live)),
            "push_to_hub": push_to_hub}
    write_json_atomic(out / EXPORT_FILE, info)
    if push_to_hub:
        push(cfg, out, push_to_hub, merge, private)
    return info
