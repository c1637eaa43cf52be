"""Statistics: Student-t quantiles and the paired t-interval over seeds (primary), and paired
bootstrap intervals over evaluation sequences. No torch, no scipy (numpy only).

Each seed is one whole experiment (its own training subset, dropout masks, batch order and
initialisation), so the spread of per-seed paired differences holds every source of training
noise; an interval over evaluation sequences (the bootstrap below) holds none of it.
"""
from __future__ import annotations

import functools
import math

import numpy as np


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (Simpson's rule on the density,
    after t = tan(u) so that the heavy tail becomes a finite interval)."""
    if df < 1:
        raise ValueError(f"df={df}: must be >= 1")
    if x == 0:
        return 0.5
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    u = np.linspace(0.0, math.atan(abs(x)), 4001)  # even number of intervals
    t = np.tan(u)
    f = const * (1 + t * t / df) ** (-(df + 1) / 2) / np.cos(u) ** 2  # density in u
    h = u[1] - u[0]
    area = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The x with P(T <= x) = p, by bisection on `t_cdf` (to about 1e-10)."""
    if not 0 < p < 1:
        raise ValueError(f"p={p}: must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_t_interval(diffs, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper) of per-seed paired differences: mean -/+ t_{n-1} s / sqrt(n).
    NaN bounds with fewer than two seeds (no spread to estimate); NaN differences are dropped."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=float)
    if len(d) == 0:
        return (math.nan,) * 3
    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(1 - (1 - level) / 2, len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resampling counts: row b says how often each of n sequences is drawn in
    bootstrap sample b (n draws with replacement)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx])


def paired_bootstrap_stat(stat, n: int, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """(stat on all sequences, lower, upper): percentile bootstrap interval of `stat`, a function
    of sequence weights w [..., n] (all ones = the observed data) returning [...]. Paired: every
    quantity inside `stat` is computed on the same resampled sequences."""
    w = bootstrap_counts(n, n_boot, seed).astype(float)
    boots = stat(w)
    tail = (1 - level) / 2
    return float(stat(np.ones((1, n)))[0]), float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


# kept beside paired_bootstrap_stat: the mean paired difference over sequences, for numbers a user holds
def paired_bootstrap_ci(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple:
    """(mean of a - b, lower, upper): percentile bootstrap CI of the mean paired difference,
    resampling the evaluation sequences (a[j] and b[j] measured on the same sequence j)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need two equal-length 1-D sequences of >= 2 values; got shape {d.shape}")
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
