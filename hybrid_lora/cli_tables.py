"""The `table` command of the CLI: the continual-learning, rank-sweep, rank-flexibility and
allocation tables of a results folder, printed and written as CSV beside the runs."""
from __future__ import annotations

import argparse
from pathlib import Path


def write_table(results: Path, name: str, table, index: bool = False, hint: str = "") -> Path:
    """Write `table` to `results/name` (atomically); ValueError, leaving any file there as it
    was, when the table has no rows, no seed behind any row, or not one number that is not NaN
    (`hint`: why that may be)."""
    from .results import write_text_atomic

    numbers = table.select_dtypes("number").drop(columns=["n_seeds", "fraction"], errors="ignore")
    seeds = table["n_seeds"] if "n_seeds" in table.columns else None
    if table.empty or (seeds is not None and not (seeds > 0).any()) or numbers.isna().all().all():
        kept = f"; the {name} already there is left as it was" if (results / name).exists() else ""
        raise ValueError(f"{name} not written: the table has no numbers ({len(table)} row{'' if len(table) == 1 else 's'}"
                         f"{', no seed in any' if seeds is not None and len(table) else ''}){hint}{kept}")
    return write_text_atomic(results / name, lambda f: table.to_csv(f, index=index))


def table_command(args: argparse.Namespace) -> int:
    """`table`: print the continual-learning table and write it to <results>/cl_table.csv."""
    import pandas as pd

    from .analysis.cl_results import BASELINE, cl_markdown, cl_table, matched_gain_table, matched_markdown
    from .analysis.markdown import markdown_table

    results = Path(args.results)
    if args.paper:
        return paper_command(results, args.markdown)
    if args.per_input:
        return per_input_command(results, args.markdown, args.per_input)
    if args.allocation:
        return allocation_command(results, args.markdown, args.reference or "lora_small")
    if args.rank_flex:
        return rank_flex_command(results, args.markdown, args.reference or "lora")
    if args.rank_sweep:
        return rank_table_command(results, args.markdown, args.reference)
    # --reference alone: the run the table's paired differences are against (with --matched-gain it
    # names the matched run instead, and cl_table stays against sequential LoRA)
    own = args.reference if args.matched_gain is None else None
    cl_baseline = own or BASELINE
    table = cl_table(results, baseline=cl_baseline, n_boot=args.n_boot)
    if own and own not in table.index:
        raise ValueError(f"--reference {own!r}: no finished run of that name under {results} "
                         f"(runs: {', '.join(table.index)})")
    tables = [(table, cl_markdown(cl_baseline), "cl_table.csv", True)]
    if args.matched_gain is not None:
        baseline = args.reference or BASELINE
        tables.append((matched_gain_table(results, args.matched_gain, baseline, n_boot=args.n_boot),
                       matched_markdown(baseline),
                       "matched_gain.csv", False))
    cols = ["method", "lambda", "n_seeds", "delta_loss_first", "new_gain", "d_forget_seed",
            "d_forget_seed_lo", "d_forget_seed_hi", "d_new_gain_seed", "d_new_gain_seed_lo",
            "d_new_gain_seed_hi", "forgets_less_seed", "seeds_forget_less"]
    hint = (f": no seed's validation gain reaches {args.matched_gain} x that of {args.reference or BASELINE}"
            if args.matched_gain is not None else "")
    for t, spec, name, index in tables:
        if args.markdown:
            print(markdown_table(t, spec))
        else:
            with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 4):
                print(t[cols] if name == "cl_table.csv" else t)
        path = write_table(results, name, t, index, hint if name == "matched_gain.csv" else "")
        print(f"written: {path}")
    return 0


def rank_flex_command(results: Path, markdown: bool, reference: str) -> int:
    """`table --rank-flex`: the rank-flexibility benchmark tables of the Stage-1 adapter on A and
    the final adapter on B."""
    import pandas as pd

    from .analysis.markdown import markdown_table
    from .analysis.rank_flex import rank_flex_benchmark, rank_flex_markdown_spec
    from .analysis.sweep_results import load_sweeps

    swept = set(load_sweeps(results)[["adapter", "domain"]].itertuples(index=False, name=None))
    for adapter, domain in [pair for pair in (("stage1", "A"), ("final", "B")) if pair in swept]:
        table, ref = rank_flex_benchmark(results, adapter, domain, reference)
        print(f"{'Stage-1' if adapter == 'stage1' else 'Final'} adapter on {domain}: share of the gain of "
              f"{reference} trained at each rank that a cut keeps (lambda chosen on validation texts):")
        shown = table[table["chosen"]]
        if markdown:
            print(markdown_table(shown, rank_flex_markdown_spec(shown)))
        else:
            with pd.option_context("display.width", 250, "display.max_columns", 50, "display.precision", 3):
                print(shown)
        print(f"{reference} trained at each rank, loss: " +
              ", ".join(f"r={c[5:]}: {ref.loc[0, c]:.4f}" for c in ref.columns if c.startswith("loss_")))
        path = write_table(results, f"rank_flex_{adapter}_{domain}.csv", table)
        print(f"written: {path}")
    return 0


def rank_table_command(results: Path, markdown: bool, reference: str | None = None) -> int:
    """`table --rank-sweep`: the `rank_sweep_table` of the Stage-1 adapter on A and of the final
    adapter on B (on the other domain an adapter's gain is near zero, so shares of it are noise)."""
    import pandas as pd

    from .analysis.markdown import markdown_table
    from .analysis.sweep_results import load_sweeps, rank_sweep_markdown_spec, rank_sweep_table

    sweeps = load_sweeps(results)
    suffix = f"_vs_{reference}" if reference else ""
    swept = set(sweeps[["adapter", "domain"]].itertuples(index=False, name=None))
    for adapter, domain in [pair for pair in (("stage1", "A"), ("final", "B")) if pair in swept]:
        t = rank_sweep_table(sweeps, adapter, domain, reference)
        print(f"{'Stage-1' if adapter == 'stage1' else 'Final'} adapter on {domain}, share of "
              f"{'the gain of ' + reference + ' uncut' if reference else 'its own uncut gain'} kept:")
        if markdown:
            print(markdown_table(t, rank_sweep_markdown_spec(t)))
        else:
            with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 3):
                print(t)
        path = write_table(results, f"rank_table_{adapter}_{domain}{suffix}.csv", t)
        print(f"written: {path}")
    return 0


def allocation_command(results: Path, markdown: bool, baseline: str) -> int:
    """`table --allocation`: the allocation study's table in loss and in accuracy."""
    import pandas as pd

    from .analysis.allocation_results import allocation_markdown, allocation_table
    table = allocation_table(results, baseline)
    for x in ("loss", "acc"):
        print(f"{x}: mean over seeds (difference from {baseline}, same seed [95% t-interval over seeds]); "
              "stage1_first = Stage-1 adapter on the first domain, final_last / final_first = final adapter")
        if markdown:
            print(allocation_markdown(table, x))
        else:
            cols = ["run", "n_seeds"] + [c for c in table.columns if c.endswith(x) or f"_{x}_" in c] + ["params_final"]
            with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 4):
                print(table[cols])
    path = write_table(results, "allocation_table.csv", table)
    print(f"written: {path}")
    return 0


def per_input_command(results: Path, markdown: bool, run: str) -> int:
    """`table --per-input RUN`: `per_input_table` of RUN, printed and written as per_input_table.csv."""
    import pandas as pd

    from .analysis.allocation_results import PER_INPUT_MARKDOWN, per_input_table
    from .analysis.markdown import markdown_table
    table = per_input_table(results, run)
    print(f"{run}: rank per input (feature) against a fixed cut and random ranks at the same average; "
          "differences feature - control, same seed, nats/token (loss) and share of tokens (acc)")
    if markdown:
        print(markdown_table(table, PER_INPUT_MARKDOWN))
    else:
        with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 4):
            print(table)
    path = write_table(results, "per_input_table.csv", table)
    print(f"written: {path}")
    return 0


def paper_command(results: Path, markdown: bool) -> int:
    """`table --paper`: the paper's table, its claims as paired differences, the Stage-2 curve."""
    from .analysis.markdown import markdown_table
    from .analysis.paper_results import PAPER_COLUMNS, paper_claims, paper_table, stage2_curve

    def spec(keys, columns, digits=".4f"):
        return [(k, k if k != "n" else "n_seeds", "d" if k in ("n", "epoch", "rank") else "s") for k in keys] + \
            [(label, (col, f"{col}_lo", f"{col}_hi"), digits) for col, label in columns.items()]

    parts = [("The paper's table (loss in nats/token; mean [95% t-interval over seeds]):", paper_table(results),
              spec(("run", "n"), PAPER_COLUMNS) + [("LoRA parameters", "lora_params", ",")], "paper_table.csv"),
             ("Its claims, paired by seed (run a - run b; mean [95% t-interval]):", paper_claims(results),
              spec(("claim", "runs", "n"), {"diff": "difference"}, "+.4f"), "paper_claims.csv"),
             ("Stage 2 epoch by epoch (evaluation loss on B; mean [95% t-interval]):", stage2_curve(results),
              spec(("run", "epoch", "rank", "n"), {"eval_loss": "eval loss on B"}), "stage2_curve.csv")]
    for title, table, columns, name in parts:
        print(title)
        text = markdown_table(table, columns)
        print(text if markdown else text.replace("|---", "").replace(" | ", "  ").strip("| \n"))
        print(f"written: {write_table(results, name, table)}")
    return 0
