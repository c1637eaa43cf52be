"""Command line: `python -m hybrid_lora run --preset smoke|paper ... --out DIR`."""
from __future__ import annotations

import argparse
import sys

from .config import METHOD_NAMES, PRESETS, ExperimentConfig, from_preset
from .results import format_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hybrid_lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate methods x seeds, write results")
    run.add_argument("--preset", choices=PRESETS, default="smoke")
    run.add_argument("--methods", nargs="+", choices=METHOD_NAMES, help="default: all four")
    run.add_argument("--seeds", nargs="+", type=int, help="default: the preset's seeds")
    run.add_argument("--data-dir", help="read <DIR>/<domain>.jsonl instead of the hub / built-in corpus")
    run.add_argument("--model", help="base model: hub name or local folder")
    run.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                     help="override any ExperimentConfig field, e.g. --set lambda_dc=0.5 rank_schedule=8,4,2")
    run.add_argument("--out", required=True, help="results folder")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    plot = sub.add_parser("plot", help="redraw every figure of a results folder (no training, no GPU)")
    plot.add_argument("--results", required=True, help="a folder written by `run`")
    plot.add_argument("--images", required=True, help="where to write the PNG files")
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The preset, then --data-dir / --model / --methods / --seeds, then --set overrides."""
    cfg = from_preset(args.preset, data_dir=args.data_dir, model_name=args.model,
                      methods=args.methods, seeds=args.seeds)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return cfg.with_overrides(overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plot":
        from .plots import plot_all

        for path in plot_all(args.results, args.images):
            print(path)
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    from .train import run_all  # heavy imports only once the arguments are good

    rows = run_all(cfg, args.out, progress=not args.no_progress)
    print(format_table(rows))
    print(f"results: {args.out}/<method>/seed<k>/ ; summary: {args.out}/summary.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
