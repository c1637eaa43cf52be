"""Markdown tables of result DataFrames, as the README prints them. No torch here.

    print(markdown_table(cl_table(out), CL_MARKDOWN))   # spec: (header, column(s), format) per column
"""
from __future__ import annotations

import math


def _fmt(x, spec: str) -> str:
    """`x` formatted by `spec` ("d": as an integer); "" for NaN."""
    if isinstance(x, float) and math.isnan(x):
        return ""
    return str(int(x)) if spec == "d" else format(x, spec)


def markdown_table(table, spec) -> str:
    """A markdown table of `table` (a DataFrame; its index is available as column "run"):
    one column per (header, source, format) of `spec`; a (mean, sd) source prints "m ± sd",
    a (mean, lo, hi) source "m [lo, hi]". The README's tables are this output, pasted."""
    df = table.reset_index() if table.index.name else table
    lines = ["| " + " | ".join(h for h, _, _ in spec) + " |", "|" + "---|" * len(spec)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell(r, src, f) for _, src, f in spec) + " |")
    return "\n".join(lines)


def _cell(r, src, f: str) -> str:
    """One markdown cell: a column; "m ± sd" (sd NaN: "m"); "m [lo, hi]" (no interval: said so;
    m NaN, the baseline itself: "—")."""
    if isinstance(src, str):
        return _fmt(r[src], f)
    m = r[src[0]]
    if len(src) == 2:
        sd = r[src[1]]
        if math.isnan(m) or math.isnan(sd):
            return _fmt(m, f)
        return f"{_fmt(m, f)} ± {_fmt(sd, f.lstrip('+'))}"
    lo, hi = r[src[1]], r[src[2]]
    if math.isnan(m):
        return "—"
    if math.isnan(lo):
        return f"{_fmt(m, f)} [one seed: no interval]"
    return f"{_fmt(m, f)} [{_fmt(lo, f)}, {_fmt(hi, f)}]"
