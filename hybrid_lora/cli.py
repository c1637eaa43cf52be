"""Command line: `python -m hybrid_lora run|plot|table|sweep-ranks|per-input|export ...` (see --help of each)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import (METHOD_NAMES, PRESETS, SEED_LIMIT, SEQUENCES, SWEEP_KINDS, ExperimentConfig, file_changes,
                     from_preset)
from .cli_tables import table_command
from .results import format_table


def _number(kind, ok, what: str):
    """An argparse `type`: `kind(text)` when `ok` of it, else a usage error naming the option,
    the value and `what` it must be."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


POSITIVE = _number(int, lambda v: v >= 1, "a positive integer")
SEED = _number(int, lambda v: 0 <= v < SEED_LIMIT, "a seed (an integer from 0 to 2**63 - 1)")
FRACTION = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1], e.g. 0.9 for 90 %")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hybrid_lora", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="train and evaluate methods x seeds, write results")
    run.add_argument("--preset", choices=PRESETS, default="smoke")
    run.add_argument("--methods", nargs="+", choices=METHOD_NAMES,
                     help="default: the paper's four (lora dylora dc hybrid)")
    run.add_argument("--seeds", nargs="+", type=SEED, help="default: the preset's seeds")
    run.add_argument("--sequence", choices=tuple(SEQUENCES),
                     help="a shipped domain sequence (or --set domains=a,b,c for any other)")
    run.add_argument("--lambdas", nargs="+", default=[], metavar="METHOD=L1,L2,...",
                     help="lambda sweeps after the methods, e.g. --lambdas dc=0.1,1,10 l2=0.01:1 "
                          "(LO:HI = 3 values per decade); runs go to <out>/<method>_lam<value>/")
    run.add_argument("--ranks", nargs="+", default=[], metavar="METHOD=K1,K2,...",
                     help="also train METHOD at each LoRA rank K (runs <method>_r<K>), e.g. --ranks "
                          "lora=1,2,4,8,16,32: the per-rank references of the rank-flexibility benchmark")
    run.add_argument("--data-dir", help="read <DIR>/<domain>.jsonl instead of the hub / built-in corpus")
    run.add_argument("--model", help="base model: hub name or local folder")
    run.add_argument("--config", metavar="FILE",
                     help="a YAML or JSON file of ExperimentConfig fields on top of the preset (a run's "
                          "config.json reruns that run); --data-dir, --model, --methods, --seeds and --set "
                          "apply on top of it")
    run.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                     help="override any ExperimentConfig field, e.g. --set lambda_dc=0.5 rank_schedule=8,4,2")
    run.add_argument("--suffix", default="", help="run folders <method><SUFFIX>, e.g. --suffix _delta_w "
                                                   "with --set dc_variant=delta_w beside the default runs")
    run.add_argument("--out", required=True, help="results folder")
    run.add_argument("--shard", metavar="I/N",
                     help="run only shard I (from 0) of N of the grid of runs (methods x seeds, then "
                          "lambda sweeps), e.g. one per GPU or machine on a shared --out; default: "
                          "the SLURM job-array task when SLURM_ARRAY_TASK_ID is set, else all")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    plot = sub.add_parser("plot", parents=[common], help="redraw every figure of a results folder (no training, no GPU)")
    plot.add_argument("--results", required=True, help="a folder written by `run`")
    plot.add_argument("--images", required=True, help="where to write the PNG files")
    plot.add_argument("--only", nargs="+", default=[], metavar="PREFIX",
                      help="only figures whose file name starts with PREFIX, e.g. --only pareto")
    table = sub.add_parser("table", parents=[common], help="continual-learning table of a results folder: mean, s.d., "
                                         "seed-level and bootstrap CIs against sequential LoRA; "
                                         "writes cl_table.csv (and matched_gain.csv)")
    table.add_argument("--results", required=True, help="a folder written by `run`")
    table.add_argument("--n-boot", type=POSITIVE, default=2000, help="bootstrap resamples (default 2000)")
    table.add_argument("--markdown", action="store_true", help="print the tables as markdown (as in the README)")
    table.add_argument("--matched-gain", type=FRACTION, metavar="FRACTION",
                       help="also the forgetting of each lambda-swept method at FRACTION x sequential "
                            "LoRA's validation gain on the new domain (e.g. 0.9); writes matched_gain.csv")
    table.add_argument("--rank-sweep", action="store_true",
                       help="instead: the rank-sweep tables (share of the gain kept per rank, loss AUC, "
                            "seed-level CIs) of the Stage-1 adapter on A and the final one on B; writes "
                            "rank_table_<adapter>_<domain>.csv")
    table.add_argument("--reference", metavar="RUN",
                       help="with --rank-sweep: shares of this run's uncut gain (same seed), e.g. lora; "
                            "with --allocation: the baseline (default lora_small); "
                            "with --rank-flex: the method trained at each rank (default lora); "
                            "with --matched-gain: the run whose validation gain is matched and whose "
                            "forgetting is subtracted (default lora), e.g. dynamic_protect; "
                            "alone: the run the continual-learning table's paired differences are "
                            "against (default lora), e.g. lora_r2")
    table.add_argument("--allocation", action="store_true",
                       help="instead: the allocation study (preset dynamic): allocating methods, uniform LoRA "
                            "at the budget and plain LoRA cut to it by SVD, loss and accuracy after each stage "
                            "with seed-level CIs against --reference (default lora_small); writes allocation_table.csv")
    table.add_argument("--rank-flex", action="store_true",
                       help="instead: the rank-flexibility benchmark (run with --ranks lora=1,2,...): per "
                            "rank the share of the gain of a LoRA trained at that rank, AURAC, time / LoRA, "
                            "seed-level CIs, lambdas chosen on validation texts; writes rank_flex_<adapter>_<domain>.csv")
    table.add_argument("--paper", action="store_true",
                       help="instead: the paper's table (A before / after, B, forgetting, retention, LoRA "
                            "parameters; mean [95%% t-interval] over seeds) and its claims as paired differences; "
                            "writes paper_table.csv, paper_claims.csv, stage2_curve.csv")
    table.add_argument("--per-input", metavar="RUN",
                       help="instead: rank per input of RUN's per_input.json files (command per-input) against "
                            "fixed and random ranks at the same average, paired by seed; writes per_input_table.csv")
    sweep = sub.add_parser("sweep-ranks", parents=[common], help="evaluate a run's saved adapters cut to each rank "
                                              "on its evaluation texts, and on its validation texts where "
                                              "the run has them (no training); merges into <run>/sweep.json")
    sweep.add_argument("--run", required=True, help="a run folder, <out>/<method>/seed<k>")
    sweep.add_argument("--ranks", nargs="+", type=POSITIVE, help="default: the run's sweep_ranks")
    sweep.add_argument("--kinds", nargs="+", choices=SWEEP_KINDS, help="default: the run's sweep_kinds")
    sweep.add_argument("--scaling", choices=("method", "preserve", "dylora", "both"), default="method",
                       help="slicing convention; 'method': the one the method trains with")
    sweep.add_argument("--device", help="default: the run's device setting")
    sweep.add_argument("--n-eval", type=POSITIVE, metavar="N",
                       help="evaluate on the first N evaluation texts of each domain (default: the "
                            "run's sweep_n_eval, else all); rows hold the base model on the same texts")
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    exp = sub.add_parser("export", parents=[common], help="write a run's adapter cut to a rank as a PEFT adapter "
                         "folder (or, --merge, a full model); no training")
    exp.add_argument("run", help="a run folder, <out>/<method>/seed<k>")
    exp.add_argument("--adapter", default="final", help="final (default), stage1, stage2, ...")
    exp.add_argument("--rank", type=POSITIVE, help="default: the adapter's own rank (no cut)")
    exp.add_argument("--cut", choices=SWEEP_KINDS, default="svd",
                     help="svd (default): best rank K per module; slice: first K components; "
                          "svd_alloc: rank K's parameters spread over modules by singular value")
    exp.add_argument("--scaling", choices=("method", "preserve", "dylora"), default="method",
                     help="slicing convention; 'method': the one the method trains with")
    exp.add_argument("--out", required=True, help="the folder to write (an earlier export there is replaced)")
    exp.add_argument("--merge", action="store_true", help="merge into the base model and save the full model "
                     "and tokenizer (AutoModelForCausalLM.from_pretrained loads it)")
    exp.add_argument("--push-to-hub", metavar="REPO", help="then upload it to the hub repo REPO (org/name)")
    exp.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    per = sub.add_parser("per-input", parents=[common], help="rank chosen per input on a nested run's final "
                         "adapter, against random and fixed ranks at the same average; writes <run>/per_input.json")
    per.add_argument("--run", required=True, help="a finished matryoshka or dylora_nested run folder")
    per.add_argument("--averages", nargs="+", type=POSITIVE, help="average ranks (default 3, 6, 12, ... below r)")
    per.add_argument("--device", default="cpu")
    per.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_folder(path: str) -> Path:
    """`--run PATH` as a Path; FileNotFoundError when it holds no config.json."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--run {path}: no config.json there, so not a run folder "
                                "(expected <out>/<method>/seed<k>)")
    return Path(path)


def sweep_command(args: argparse.Namespace) -> int:
    """`sweep-ranks`: rebuild the run's config and evaluation data, sweep, print the rows."""
    from .runs import resweep

    run = run_folder(args.run)
    rows = resweep(run, args.ranks, args.kinds, args.scaling, args.device, args.n_eval,
                   progress=not args.no_progress)
    print(f"{'adapter':<8}{'domain':>7}{'kind':>10}{'scaling':>10}{'rank':>6}{'loss':>9}{'acc':>8}")
    for r in sorted(rows, key=lambda r: (r["adapter"], r["domain"], r["kind"], r["scaling"], r["rank"])):
        print(f"{r['adapter']:<8}{r['domain']:>7}{r['kind']:>10}{r['scaling']:>10}{r['rank']:>6}"
              f"{r['loss']:>9.4f}{r['acc']:>8.4f}")
    print(f"written: {run / 'sweep.json'}")
    return 0


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The preset, then the --config file, then --data-dir / --model / --methods / --seeds,
    then --set overrides."""
    flags = {"model_name": args.model, "methods": args.methods, "seeds": args.seeds}
    if args.config:  # the file's None values count (from_preset drops them)
        changes = {**file_changes(args.config), **{k: v for k, v in flags.items() if v is not None}}
        if args.data_dir is not None:
            changes.update(data_source="local", data_dir=str(args.data_dir))
        cfg = dataclasses.replace(from_preset(args.preset, sequence=args.sequence), **changes)
    else:
        cfg = from_preset(args.preset, data_dir=args.data_dir, sequence=args.sequence, **flags)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return cfg.with_overrides(overrides)


def parse_lambdas(items: list[str]) -> dict[str, tuple[float, ...]]:
    """["dc=0.1,1", "l2=0.01"] -> {"dc": (0.1, 1.0), "l2": (0.01,)}; ValueError naming a bad item."""
    from .grid import lambda_grid
    from .methods import check_lambdas

    out = {}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in METHOD_NAMES:
            raise ValueError(f"--lambdas {item!r}: expected METHOD=L1,L2,... with a method of {METHOD_NAMES}")
        try:
            if ":" in values:  # LO:HI, 3 per decade
                lo, hi = (float(v) for v in values.split(":"))
            else:
                out[method] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--lambdas {item!r}: {values!r} is not a list of numbers nor LO:HI") from None
        if ":" in values:
            if not 0 < lo <= hi:
                raise ValueError(f"--lambdas {item!r}: the range LO:HI = {values} needs 0 < LO <= HI"
                                 f"{f', e.g. {method}={hi:g}:{lo:g}' if 0 < hi < lo else ''}")
            out[method] = lambda_grid(lo, hi)
    check_lambdas(out)
    return out


def parse_ranks(items: list[str]) -> dict[str, tuple[int, ...]]:
    """["lora=1,2,4"] -> {"lora": (1, 2, 4)}; ValueError naming a bad item."""
    out = {}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in METHOD_NAMES:
            raise ValueError(f"--ranks {item!r}: expected METHOD=K1,K2,... with a method of {METHOD_NAMES}")
        try:
            out[method] = tuple(int(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--ranks {item!r}: {values!r} is not a list of integers") from None
        if not out[method] or min(out[method]) < 1:
            raise ValueError(f"--ranks {item!r}: give positive integer ranks")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors a user can act on (a bad value, a missing or unwritable file, a
    non-finite loss) print one line and exit 2; `--debug` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return dispatch(parser, args)
    except KeyboardInterrupt as err:  # Ctrl-C: where the run stands, exit 130 as a shell expects
        if args.debug:
            raise
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ArithmeticError) as err:
        if args.debug:
            raise
        print(f"error: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 2


def dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The command `args.command` with its arguments."""
    if args.command == "sweep-ranks":
        return sweep_command(args)
    if args.command == "export":
        from .export import export_run

        info = export_run(run_folder(args.run), args.out, args.adapter, args.rank, args.cut, args.scaling,
                          args.merge, args.push_to_hub, args.private)
        what = "model (merged)" if info["merged"] else "PEFT adapter"
        print(f"{what} at rank {info['rank']} (cut {info['cut']}, of rank {info['adapter_rank']}), "
              f"{info['lora_params']:,} LoRA parameters: {args.out}"
              + (f"; pushed to {args.push_to_hub}" if args.push_to_hub else ""))
        return 0
    if args.command == "per-input":
        from .per_input import per_input_run

        out = per_input_run(run_folder(args.run), args.averages, args.device, progress=not args.no_progress)
        print(f"{'domain':<8}{'policy':>8}{'average':>8}{'given':>8}{'loss':>9}{'acc':>8}")
        for r in out["rows"]:
            print(f"{r['domain']:<8}{r['policy']:>8}{r['target_avg']:>8}{r['avg_rank']:>8.2f}"
                  f"{r['loss']:>9.4f}{r['acc']:>8.4f}")
        print(f"written: {Path(args.run) / 'per_input.json'}")
        return 0
    if args.command == "table":
        return table_command(args)
    if args.command == "plot":
        from .plots import plot_all

        paths = plot_all(args.results, args.images, only=tuple(args.only))
        if args.only and not paths:
            raise ValueError(f"--only {' '.join(args.only)}: no figure of {args.results} has a name that "
                             "starts so; run without --only to draw them all and see their names")
        for path in paths:
            print(path)
        return 0
    from .grid import parse_shard, shard_from_env

    try:
        cfg = config_from_args(args)
        lambdas = parse_lambdas(args.lambdas)
        shard = parse_shard(args.shard) if args.shard else shard_from_env()
        ranks = parse_ranks(args.ranks)
    except ValueError as err:
        parser.error(str(err))
    from .grid import run_all  # heavy imports only once the arguments are good

    from .distributed import is_main

    rows = run_all(cfg, args.out, progress=not args.no_progress and is_main(), lambdas=lambdas,
                   suffix=args.suffix, shard=shard, ranks=ranks)
    if is_main():  # under accelerate / torchrun: one report, not one per process
        print(format_table(rows))
        print(f"results: {args.out}/<method>/seed<k>/ ; summary: {args.out}/summary.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
