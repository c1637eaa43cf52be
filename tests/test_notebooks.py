"""The numbered notebooks: conventions, no committed outputs, and a smoke run of each, in order."""
import ast
import json
import time
from pathlib import Path

import pytest

from hybrid_lora.results import read_json, run_dir

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_stage1_imdb.ipynb", "02_stage2_yelp_rank_rebuild.ipynb",
             "03_multi_seed_sweep.ipynb", "04_plots.ipynb", "05_rank_sweep.ipynb", "06_forgetting.ipynb",
             "07_rank_flexibility.ipynb", "08_dynamic_lora.ipynb"]


def cells(name: str) -> list[dict]:
    return json.loads((NOTEBOOK_DIR / name).read_text())["cells"]


def test_the_numbered_notebooks_are_all_there():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    for cell in cells(name):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                f"{name}: strip the outputs before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_conventions(name):
    """Colab badge; one `parameters` cell of plain values; setup that installs only in Colab;
    no functions or classes defined in the notebook (logic lives in the package)."""
    nb = cells(name)
    assert "colab.research.google.com/github/" in "".join(nb[0]["source"])
    assert f"notebooks/{name}" in "".join(nb[0]["source"])
    tagged = [c for c in nb if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    for stmt in ast.parse("".join(tagged[0]["source"])).body:
        assert isinstance(stmt, ast.Assign), ast.dump(stmt)
        ast.literal_eval(stmt.value)  # raises unless a plain value
    setup = "".join(nb[2]["source"])
    assert 'if IN_COLAB:\n    %pip install' in setup and "torch" not in setup.split("%pip")[1].split("\n")[0]
    for cell in nb:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"]).replace("%pip", "#")
            tree = ast.parse(source)
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                                                                   ast.Lambda))], name


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Execute 01 -> 04 with papermill in smoke mode, sharing one output folder."""
    import papermill
    work = tmp_path_factory.mktemp("notebooks")
    out = work / "runs"
    params = {
        "01_stage1_imdb.ipynb": {"SMOKE": True, "OUT_DIR": str(out), "CHECKPOINT_EVERY": 10},
        "02_stage2_yelp_rank_rebuild.ipynb": {"SMOKE": True, "OUT_DIR": str(out), "CHECKPOINT_EVERY": 10},
        "03_multi_seed_sweep.ipynb": {"SMOKE": True, "OUT_DIR": str(out), "CHECKPOINT_EVERY": 10,
                                      "SEEDS": [42, 43]},
        "04_plots.ipynb": {"RESULTS_DIR": str(out), "IMAGE_DIR": str(work / "images")},
        "05_rank_sweep.ipynb": {"SMOKE": True, "OUT_DIR": str(work / "sweep"), "SEEDS": [42]},
        "06_forgetting.ipynb": {"SMOKE": True, "OUT_DIR": str(work / "forgetting"), "SEEDS": [42, 43],
                                "METHODS": ["lora", "dc", "single", "l2", "freeze_add"],
                                "LAMBDAS": {"dc": [1.0]}, "N_TRAIN": 64, "N_EVAL": 32, "N_VAL": 16},
        "07_rank_flexibility.ipynb": {"SMOKE": True, "OUT_DIR": str(work / "rank_flex"), "SEEDS": [42, 43],
                                      "LAMBDAS_ORDER": [0.01], "REFERENCE_RANKS": [1, 4],
                                      "N_TRAIN": 32, "N_EVAL": 16, "N_VAL": 8},
        "08_dynamic_lora.ipynb": {"SMOKE": True, "OUT_DIR": str(work / "dynamic"), "SEEDS": [42, 43],
                                  "IMPORTANCE_VARIANTS": ["fisher"], "LAMBDAS": {"l2": [1.0], "ewc": [1e5]},
                                  "N_TRAIN": 32, "N_EVAL": 16, "N_VAL": 8,
                                  "NESTED_DIR": str(work / "rank_flex" / "imdb-yelp")},
    }
    seconds, texts = {}, {}
    for name in NOTEBOOKS:
        start = time.perf_counter()
        done = papermill.execute_notebook(str(NOTEBOOK_DIR / name), str(work / name), parameters=params[name],
                                          kernel_name="python3", cwd=str(work), progress_bar=False)
        seconds[name] = time.perf_counter() - start
        texts[name] = json.dumps(done["cells"])
    print("notebook wall times (s):", {k: round(v, 1) for k, v in seconds.items()})
    return {"work": work, "out": out, "texts": texts}


def test_stage1_notebook_stops_after_stage1_and_saves_its_figure(executed):
    run = run_dir(executed["out"], "hybrid", 42)
    assert (run / "adapter_stage1" / "adapter_config.json").exists()
    assert (executed["out"] / "images" / "stage1_hybrid_seed42.png").exists()
    assert f"Stage-1 results written to {run}" in executed["texts"]["01_stage1_imdb.ipynb"]


def test_stage2_notebook_continues_the_same_run(executed):
    run = run_dir(executed["out"], "hybrid", 42)
    assert [(h["stage"], h["rank"]) for h in read_json(run / "history.json")] == \
        [(1, 8), (1, 8), (2, 8), (2, 4), (2, 2)]
    assert set(read_json(run / "metrics.json")) >= {"A_after_stage1", "A_after_stage2", "B_after_stage2"}
    for figure in ("history_hybrid_seed42.png", "cos_to_stage1_hybrid_seed42.png"):
        assert (executed["out"] / "images" / figure).exists()
    assert f"Stage-1 adapter: {run / 'adapter_stage1'}" in executed["texts"]["02_stage2_yelp_rank_rebuild.ipynb"]


def test_sweep_notebook_skips_the_finished_run_and_runs_the_rest(executed):
    assert "hybrid seed 42: complete" in executed["texts"]["03_multi_seed_sweep.ipynb"]
    assert len(summary_lines(executed["out"] / "summary.csv")) == 8  # 4 methods x 2 seeds
    assert (executed["out"] / "images" / "methods_acc.png").exists()


def test_plots_notebook_redraws_every_figure(executed):
    images = sorted(p.name for p in (executed["work"] / "images").glob("*.png"))
    assert images == sorted(["methods_acc.png", "methods_loss.png", "cos_to_stage1.png", "pareto.png", "stage2_curve.png"]
                            + [f"history_{m}_seed{s}.png" for m in ("lora", "dylora", "dc", "hybrid")
                               for s in (42, 43)]
                            + [f"rank_sweep_{a}_{d}.png" for a in ("stage1", "final") for d in "AB"])


def test_rank_sweep_notebook_sweeps_every_method(executed):
    sweep = executed["work"] / "sweep"
    for method in ("lora", "dylora", "hybrid", "dylora_nested", "hybrid_nested", "lora_small"):
        assert (run_dir(sweep, method, 42) / "sweep.json").exists()
    for figure in ("rank_sweep_stage1_A.png", "rank_sweep_final_B.png"):
        assert (sweep / "images" / figure).exists()
    assert "final adapter on B at rank 2" in executed["texts"]["05_rank_sweep.ipynb"]


def test_forgetting_notebook_tables_and_plots_every_method_and_lambda(executed):
    out = executed["work"] / "forgetting" / "imdb-code"
    import pandas as pd

    table = pd.read_csv(out / "cl_table.csv", index_col="run")
    assert set(table.index) == {"lora", "dc", "dc_lam1", "single", "l2", "freeze_add"}
    assert (table["n_seeds"] == 2).all() and table.loc["dc_lam1", "lambda"] == 1.0
    assert table.drop(index="lora")["d_forget_lo"].notna().all()
    assert table.drop(index="lora")["d_forget_seed_lo"].notna().all()  # seed-level, 2 seeds
    assert (out / "images" / "pareto.png").exists()
    text = executed["texts"]["06_forgetting.ipynb"]
    assert "after stage 2 (code)" in text and "dc_grad_norm" in text
    assert "lambda_star" in text  # the matched-gain table of the dc sweep


def test_rank_flexibility_notebook_compares_every_method_with_the_references(executed):
    out = executed["work"] / "rank_flex" / "imdb-yelp"
    for name in ("lora", "dylora_nested", "matryoshka", "dylora", "dylora_lam0.01", "lora_r1", "lora_r4"):
        assert (run_dir(out, name, 43) / "metrics.json").exists(), name
    assert any(r["kind"] == "svd" for r in read_json(run_dir(out, "lora", 42) / "sweep.json"))
    for figure in ("rank_flex_stage1_A.png", "rank_flex_final_B.png"):
        assert (out / "images" / figure).exists()
    text = executed["texts"]["07_rank_flexibility.ipynb"]
    assert "aurac" in text and "lora_r<k>" in text


def test_dynamic_lora_notebook_compares_allocations_and_ranks_per_input(executed):
    out = executed["work"] / "dynamic" / "imdb-code"
    for name in ("lora_small", "dynamic", "adalora", "lora", "dynamic_protect", "l2", "ewc", "l2_lam1",
                 "ewc_lam100000", "dynamic_fisher"):
        assert (run_dir(out, name, 43) / "metrics.json").exists(), name
    assert (run_dir(out, "dynamic", 42) / "allocated_final" / "adapter_config.json").exists()
    for run in ("dynamic", "dynamic_protect", "adalora", "dynamic_fisher"):
        assert (out / "images" / f"rank_map_{run}.png").exists()
    text = executed["texts"]["08_dynamic_lora.ipynb"]
    assert "lora svd_alloc@4" in text and "feature_vs_fixed_loss" in text and "lambda_star" in text
    nested = executed["work"] / "rank_flex" / "imdb-yelp"
    assert (run_dir(nested, "matryoshka", 42) / "per_input.json").exists()
    assert (out / "images" / "per_input_matryoshka.png").exists()


def summary_lines(path: Path) -> list[str]:
    return path.read_text().strip().splitlines()[1:]
