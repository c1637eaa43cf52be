"""Result files: layout, schema, atomic writes, derived metrics, summary table. No torch here.

Layout of one run: `<out>/<run>/seed<k>/` (`<run>` is the method, or e.g. `dc_lam1` in a
lambda sweep) with
- `config.json`   every ExperimentConfig field, plus `method`, `seed`, `schema_version`;
- `history.json`  list of per-epoch rows with keys HISTORY_KEYS (`val_loss`, `val_acc`: None
                  when n_val = 0; `machine`: the hardware, torch and threads the epoch trained
                  on, a string; each absent in files written before it was added);
- `metrics.json`  written by `run_metrics`: `R` = {"domains", "loss", "acc"}: R[t][i] on
                  domain i after stage t (t = 0 the base model); `R_val` the same on the
                  validation texts (carved from the training pool) when n_val > 0; the
                  `cl_metrics` of R; for two domains also EVAL_KEYS as {"loss", "acc"}
                  (A = Stage-1 domain, B = Stage-2 domain) and DERIVED_KEYS; SWEEP_KEYS when
                  swept; `schema_version`. One key, one meaning: a number stays a number.
- `eval_sequences.json`  {"domains", "R": R[t][i] = {"nll", "tokens", "hits"}, one entry per
                  evaluation sequence}: the sums behind every entry of R (bootstrap intervals);
                  compact JSON, one line;
- `stage1.json`   Stage 1's key, history and R rows 0-1 (lets identical runs share Stage 1,
                  together with `adapter_stage1/`; `copied_from` names the run it was taken from;
                  like the adapters, not committed to the repository);
- `adapter_stage<t>/` for t < T, `adapter_final/`: PEFT `save_pretrained` folders (for
                  freeze-and-add methods, each stage's own adapter).
- `allocation.json` (allocating methods only) {"schema_version", "modules", "costs", "epochs":
                  one entry per epoch {"stage", "epoch", "step", "ranks" (per module), "params"
                  (of the kept trained components), "frozen_params", "budget" (the one the
                  masks were fitted to: params <= budget), "importance": {estimator: per module the
                  score of each rank component}}}; `allocated_stage<t>/`, `allocated_final/`:
                  the adapters cut to their kept components (PEFT `rank_pattern`).
`<out>/summary.csv` is rebuilt from all run folders (one row per run, SUMMARY_COLUMNS;
`seconds` there is the sum of the epochs' train + eval time from history.json).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .distributed import is_main

SCHEMA_VERSION = 4
# 4: `gain_retained` is always the two-domain number (schema 3 overwrote it with the per-domain
#    list, now `gain_retained_per_domain`); rank AUCs are shares of the gain over the base
#    (SWEEP_KEYS; the old accuracy-normalised `rank_auc_*` keys are not read); `R_val`.
HISTORY_KEYS = ("stage", "epoch", "rank", "train_ce", "train_order", "train_dc", "train_penalty",
                "eval_loss", "eval_acc", "val_loss", "val_acc", "cos_to_stage1", "dc_end", "dc_grad_norm",
                "penalty_end", "penalty_grad_norm", "trainable_params", "seconds", "train_seconds", "machine")
STAGE1_FILE = "stage1.json"            # Stage 1's key, history and evaluations (for sharing it)
SEQUENCES_FILE = "eval_sequences.json"  # per-sequence sums behind every entry of R
ALLOCATION_FILE = "allocation.json"     # per-epoch ranks and importance of allocating methods
PER_INPUT_FILE = "per_input.json"      # rank per input of a nested run (command per-input)
ALLOCATION_SCHEMA = 1
EVAL_KEYS = ("A_base", "B_base", "A_after_stage1", "A_after_stage2", "B_after_stage2")
DERIVED_KEYS = ("retention", "delta_loss_A", "gain_retained")
# from sweep.json (`sweep_aucs`); NaN when not swept
SWEEP_KEYS = ("rank_auc_loss_stage1_A", "rank_auc_acc_stage1_A", "rank_auc_loss_final_B",
              "rank_auc_acc_final_B")
SWEEP_COLUMNS = ("adapter", "adapter_rank", "domain", "kind", "scaling", "rank", "loss", "acc",
                 "n_eval", "base_loss", "base_acc")  # the last three: the sequences evaluated
# From R, for any number of stages T: "first" is the Stage-1 domain, "new" the last stage's.
CL_KEYS = ("avg_final_acc", "bwt", "forgetting_first", "delta_loss_first", "delta_ppl_first",
           "gain_retained_first", "forgetting_mean", "delta_loss_mean", "new_gain", "new_acc",
           "final_loss_first", "new_loss")
# the same quantities on the validation texts (lambdas are chosen on these, never on R)
VAL_KEYS = ("val_delta_loss_first", "val_new_gain")
SUMMARY_COLUMNS = (("run", "method", "seed", "domains", "lambda", "variant")
                   + tuple(f"{k}_{m}" for k in EVAL_KEYS for m in ("loss", "acc"))
                   + DERIVED_KEYS + CL_KEYS + VAL_KEYS + SWEEP_KEYS + ("seconds",))


def write_history(run: str | Path, rows: list[dict]) -> None:
    """Write `run`'s history.json from per-epoch `rows`; their "allocation" entries (of
    allocating methods) go to allocation.json instead."""
    run = Path(run)
    entries = [{"stage": h["stage"], "epoch": h["epoch"], **h["allocation"]} for h in rows if "allocation" in h]
    write_json_atomic(run / "history.json", [{k: v for k, v in h.items() if k != "allocation"} for h in rows])
    if entries:
        first = entries[0]
        write_json_atomic(run / ALLOCATION_FILE, {
            "schema_version": ALLOCATION_SCHEMA, "modules": first["modules"], "costs": first["costs"],
            "epochs": [{k: v for k, v in e.items() if k not in ("modules", "costs")} for e in entries]},
            indent=None)


def run_dir(out: str | Path, method: str, seed: int) -> Path:
    """`<out>/<method>/seed<seed>`."""
    return Path(out) / method / f"seed{seed}"


def _file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Under this many bytes free on its disk after a write failed, the disk counts as full: torch
# and safetensors report a full disk without errno ("unexpected pos 27328 vs 27220").
DISK_FULL_FREE = 64 * 2 ** 20


class DiskFull(OSError):
    """A result or checkpoint file could not be written because its disk is full."""


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the disk that holds `path` (or its nearest existing parent); None if unknown."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


@contextlib.contextmanager
def disk_errors(path: str | Path):
    """Inside it, a write of `path` that fails on a full disk raises `DiskFull` naming the file
    and how much is free; any other error passes unchanged."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - torch: RuntimeError, safetensors: SafetensorError
        # only what a failed write raises: a bug (TypeError, ...) on a nearly full disk stays a bug
        writing = isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"
        free = _free_bytes(Path(path))
        said = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            s in str(err) for s in ("No space left", "os error 28", "StorageFull"))
        if isinstance(err, DiskFull) or not writing or not (said or (free is not None and free < DISK_FULL_FREE)):
            raise
        full = DiskFull(f"cannot write {path}: its disk is full ({_size(free)} free; {type(err).__name__}: "
                        f"{err}). Free some space, or write elsewhere, and run the same command again: a "
                        "run resumes from its latest checkpoint")
        full.errno = errno.ENOSPC
        raise full from err


def _size(n: int | None) -> str:
    return "unknown space" if n is None else f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n} bytes"


def write_text_atomic(path: str | Path, write) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`:
    an interruption never leaves a half-written file. Under several processes (accelerate)
    only process 0 writes; the others return at once."""
    path = Path(path)
    if not is_main():
        return path
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, _file_mode())  # mkstemp makes it 0600; results are for others to read too
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    """Write `obj` as JSON (indented unless `indent=None`: compact for long number lists), atomically."""
    write_text_atomic(path, lambda f: f.write(json.dumps(obj, indent=indent) + "\n"))


def read_json(path: str | Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def derived_metrics(m: dict) -> dict:
    """retention = acc A after Stage 2 / after Stage 1; delta_loss_A = loss A after Stage 2 -
    after Stage 1 (nats/token, > 0 is forgetting); gain_retained = (L_A_base - L_A_after2) /
    (L_A_base - L_A_after1), NaN when Stage 1 gained nothing."""
    a1, a2, a0 = m["A_after_stage1"], m["A_after_stage2"], m["A_base"]
    gain1 = a0["loss"] - a1["loss"]
    return {
        "retention": a2["acc"] / a1["acc"] if a1["acc"] > 0 else math.nan,
        "delta_loss_A": a2["loss"] - a1["loss"],
        "gain_retained": (a0["loss"] - a2["loss"]) / gain1 if gain1 != 0 else math.nan,
    }


def two_domain_evals(domains, loss: list[list[float]], acc: list[list[float]]) -> dict:
    """The EVAL_KEYS ({"loss", "acc"}; A = Stage-1 domain, B = Stage-2 domain) of the R rows
    present (an unfinished run has fewer); {} unless there are exactly two domains."""
    if len(domains) != 2:
        return {}
    cells = zip(EVAL_KEYS, ((0, 0), (0, 1), (1, 0), (2, 0), (2, 1)))
    return {k: {"loss": loss[t][i], "acc": acc[t][i]} for k, (t, i) in cells if t < len(loss)}


def run_metrics(domains, loss: list[list[float]], acc: list[list[float]],
                val: dict | None = None) -> dict:
    """Everything `metrics.json` holds but the sweep keys, from the R matrices (rows t = 0..T):
    `R`, the two-domain EVAL_KEYS and DERIVED_KEYS (T = 2 only), `cl_metrics`, `R_val` when
    `val` ({"loss", "acc"} on the validation texts) is given, `schema_version`. The one writer
    of these keys: runs and the tests' fake runs both call it."""
    m = two_domain_evals(domains, loss, acc)
    if m:
        m.update(derived_metrics(m))
    m["R"] = {"domains": list(domains), "loss": loss, "acc": acc}
    if val is not None:
        m["R_val"] = {"domains": list(domains), "loss": val["loss"], "acc": val["acc"]}
    m.update(cl_metrics(acc, loss))
    m["schema_version"] = SCHEMA_VERSION
    return m


def cl_columns(m: dict) -> dict:
    """The CL_KEYS and VAL_KEYS of one run's metrics.json; NaN where the file has no R (schema
    2) or no R_val. Schema 3 kept the per-domain list under `gain_retained`."""
    out = dict.fromkeys(CL_KEYS + VAL_KEYS, math.nan)
    if "R" not in m:
        return out
    loss, acc = m["R"]["loss"], m["R"]["acc"]
    T = len(acc) - 1
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    per_domain = m.get("gain_retained_per_domain", m.get("gain_retained"))
    first = lambda xs: xs[0] if xs else math.nan  # noqa: E731
    out.update({"avg_final_acc": m["avg_final_acc"], "bwt": m["bwt"],
                "forgetting_first": first(m["forgetting"]), "delta_loss_first": first(m["delta_loss"]),
                "delta_ppl_first": first(m["delta_ppl"]), "gain_retained_first": first(per_domain),
                "forgetting_mean": mean(m["forgetting"]), "delta_loss_mean": mean(m["delta_loss"]),
                "new_gain": loss[0][T - 1] - loss[T][T - 1], "new_acc": acc[T][T - 1],
                "final_loss_first": loss[T][0], "new_loss": loss[T][T - 1]})
    if "R_val" in m:
        vl = m["R_val"]["loss"]
        out.update(val_delta_loss_first=vl[T][0] - vl[1][0] if T > 1 else math.nan,
                   val_new_gain=vl[0][T - 1] - vl[T][T - 1])
    return out


def run_lambda(cfg: dict) -> float:
    """The weight of the run's method's own regularizer (lambda_dc, lambda_l2, ...), else NaN."""
    from .methods import LAMBDA_FIELDS, get_method

    reg = get_method(cfg["method"]).regularizer()
    return cfg[LAMBDA_FIELDS[reg]] if reg else math.nan


def run_variant(cfg: dict) -> str:
    """The DC variant of a method with the DC loss ("global", "per_module", "delta_w"), else ""."""
    from .methods import get_method

    return cfg.get("dc_variant", "global") if get_method(cfg["method"]).dc else ""


def summary_row(run: Path) -> dict:
    """One summary-table row from a finished run folder."""
    cfg, m = read_json(run / "config.json"), read_json(run / "metrics.json")
    row = {"run": run.parent.name, "method": cfg["method"], "seed": cfg["seed"],
           "domains": ">".join(cfg["domains"]), "lambda": run_lambda(cfg), "variant": run_variant(cfg)}
    for k in EVAL_KEYS:
        row[f"{k}_loss"], row[f"{k}_acc"] = (m[k]["loss"], m[k]["acc"]) if k in m else (math.nan,) * 2
    row.update({k: m.get(k, math.nan) for k in DERIVED_KEYS})
    if isinstance(row["gain_retained"], list):  # schema 3: the per-domain list overwrote it
        row["gain_retained"] = row["gain_retained"][0] if len(m["R"]["domains"]) == 2 else math.nan
    row.update(cl_columns(m))
    row.update({k: m.get(k, math.nan) for k in SWEEP_KEYS})
    row["seconds"] = sum(h["seconds"] for h in read_json(run / "history.json"))
    return row


def finished_runs(out: str | Path) -> list[Path]:
    """Run folders under `out` that have a metrics.json, in sorted order; ValueError when one
    was written by a newer hybrid-lora (a `schema_version` above SCHEMA_VERSION), whose keys
    this one would misread."""
    runs = sorted(p.parent for p in Path(out).glob("*/seed*/metrics.json"))
    for run in runs:
        check_schema(run)
    return runs


def check_schema(run: str | Path) -> None:
    """ValueError naming the versions when `run`'s metrics.json has a newer schema than this code."""
    path = Path(run) / "metrics.json"
    try:
        version = read_json(path).get("schema_version", 0)
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); delete its run folder {run} to run it again") from None
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r}, newer than the {SCHEMA_VERSION} this "
                         "hybrid-lora reads: update it (git pull, then pip install -e .) to read "
                         "these results")


def write_summary(out: str | Path) -> Path:
    """Rebuild `<out>/summary.csv` from every finished run folder (never appended to)."""
    rows = [summary_row(r) for r in finished_runs(out)]

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    return write_text_atomic(Path(out) / "summary.csv", write)


def load_summary(out: str | Path):
    """One row per finished run under `out` (SUMMARY_COLUMNS) as a pandas DataFrame; writes nothing."""
    import pandas as pd

    return pd.DataFrame([summary_row(r) for r in finished_runs(out)], columns=list(SUMMARY_COLUMNS))


def format_table(rows: list[dict]) -> str:
    """A short fixed-width text table of final metrics, one line per run."""
    cols = [("method", "method", "{:<10}"), ("seed", "seed", "{:>5}"),
            ("A1_acc", "A_after_stage1_acc", "{:>8.4f}"), ("A2_acc", "A_after_stage2_acc", "{:>8.4f}"),
            ("B2_acc", "B_after_stage2_acc", "{:>8.4f}"), ("retain", "retention", "{:>8.4f}"),
            ("dLossA", "delta_loss_A", "{:>+8.4f}"), ("sec", "seconds", "{:>7.1f}")]
    head = "method".ljust(10) + "".join("  " + h.rjust(len(f.format(0))) for h, _, f in cols[1:])
    body = ["  ".join(f.format(r[k]) for _, k, f in cols) for r in rows]
    return "\n".join([head] + body)


def load_run_history(run: str | Path):
    """One run's history.json (finished or still running) as a DataFrame: run, method, seed,
    HISTORY_KEYS..., and `step` (1-based epoch index across stages)."""
    import pandas as pd

    run = Path(run)
    cfg = read_json(run / "config.json")
    df = pd.DataFrame(read_json(run / "history.json"), columns=list(HISTORY_KEYS))
    df.insert(0, "seed", cfg["seed"])
    df.insert(0, "method", cfg["method"])
    df.insert(0, "run", run.parent.name)
    df["step"] = range(1, len(df) + 1)
    return df


def load_history(out: str | Path, unfinished: bool = False):
    """Every finished run's history under `out` as one long DataFrame (see `load_run_history`);
    `unfinished=True` adds runs still in progress (their history so far)."""
    import pandas as pd

    runs = (sorted(p.parent for p in Path(out).glob("*/seed*/history.json")) if unfinished
            else finished_runs(out))
    if not runs:
        raise FileNotFoundError(f"no {'' if unfinished else 'finished '}runs under {out}")
    return pd.concat([load_run_history(r) for r in runs], ignore_index=True)


def metrics_table(metrics: dict):
    """The evaluations of one run as a DataFrame: rows (domain, when), columns loss and acc."""
    import pandas as pd

    names = {"A_base": ("A", "base model"), "A_after_stage1": ("A", "after Stage 1"),
             "A_after_stage2": ("A", "after Stage 2"), "B_base": ("B", "base model"),
             "B_after_stage2": ("B", "after Stage 2")}
    rows = [(*names[k], metrics[k]["loss"], metrics[k]["acc"]) for k in names if k in metrics]
    return pd.DataFrame(rows, columns=["domain", "when", "loss", "acc"]).set_index(["domain", "when"])


def method_table(summary, columns: tuple[str, ...] = ("A_after_stage1_acc", "A_after_stage2_acc",
                                                      "B_after_stage2_acc", "retention",
                                                      "delta_loss_A"), by: str = "method"):
    """Mean and sample standard deviation over seeds per method (rows; `by="run"` keeps the
    runs of a lambda sweep apart), with the seed count."""
    grouped = summary.groupby(by, sort=False)
    table = grouped[list(columns)].agg(["mean", "std"])
    table.insert(0, ("n_seeds", ""), grouped["seed"].nunique())
    return table


def cl_metrics(acc: list[list[float]], loss: list[list[float]],
               single_acc: list[float] | None = None) -> dict:
    """Continual-learning metrics from R matrices R[t][i] (t = 0 base model, t = 1..T after
    stage t; domain i is trained in stage i + 1). Per earlier domain i < T - 1:
    forgetting = max over stages t = i+1..T-1 of acc[t][i] - acc[T][i] (accuracy); delta_loss =
    loss[T][i] - loss[i+1][i] (nats/token); delta_ppl the same in perplexity;
    gain_retained_per_domain = (loss[0][i] - loss[T][i]) / (loss[0][i] - loss[i+1][i]). Over all: avg_final_acc =
    mean_i acc[T][i]; bwt = mean over earlier domains of acc[T][i] - acc[i+1][i]. With
    `single_acc` (accuracy of training on domain i alone): plasticity[i] =
    (acc[i+1][i] - acc[0][i]) / (single_acc[i] - acc[0][i])."""
    T = len(acc) - 1
    if T < 1 or any(len(row) != T for row in acc) or len(loss) != T + 1:
        raise ValueError(f"R matrices must be (T + 1) x T with T >= 1; got {len(acc)} rows")
    earlier = range(T - 1)
    out = {
        "avg_final_acc": sum(acc[T]) / T,
        "bwt": sum(acc[T][i] - acc[i + 1][i] for i in earlier) / (T - 1) if T > 1 else math.nan,
        "forgetting": [max(acc[t][i] for t in range(i + 1, T)) - acc[T][i] for i in earlier],
        "delta_loss": [loss[T][i] - loss[i + 1][i] for i in earlier],
        "delta_ppl": [math.exp(loss[T][i]) - math.exp(loss[i + 1][i]) for i in earlier],
        "gain_retained_per_domain": [(loss[0][i] - loss[T][i]) / (loss[0][i] - loss[i + 1][i])
                                     if loss[0][i] != loss[i + 1][i] else math.nan for i in earlier],
    }
    if single_acc is not None:
        out["plasticity"] = [(acc[i + 1][i] - acc[0][i]) / (single_acc[i] - acc[0][i])
                             if single_acc[i] != acc[0][i] else math.nan for i in range(T)]
    return out


def epoch_seconds(out: str | Path) -> dict[tuple[str, int], tuple[str, list[float]]]:
    """{(run name, seed): (method, each epoch's `train_seconds`)} for finished runs that have them."""
    seconds = {}
    for run in finished_runs(out):
        history = read_json(run / "history.json")
        if history and all("train_seconds" in row for row in history):
            config = read_json(run / "config.json")
            seconds[run.parent.name, config["seed"]] = (config["method"], [row["train_seconds"] for row in history])
    return seconds


def train_seconds(out: str | Path) -> dict[tuple[str, int], float]:
    """{(run name, seed): its fastest epoch's `train_seconds`} for finished runs that have them.
    The fastest, not the sum: other work on the machine only ever slows an epoch down, and every
    epoch of these runs does the same work (same number of fixed-length batches)."""
    return {key: min(times) for key, (_, times) in epoch_seconds(out).items()}
