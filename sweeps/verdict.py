"""Paired comparison of a configuration with the baseline: pure functions, no storage.

A confirm run trains every arm (the baseline and each configuration) on the same fresh seeds;
seed s of an arm is paired with seed s of the baseline, so the seed's share of the variance
(initialisation, data order) cancels in the difference d_s = arm_s - baseline_s.

The interval is Student's t on the paired differences:
    mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n),   sd with n - 1 in the denominator.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

BETTER, SAME, WORSE = "better", "not distinguishable", "worse"


@dataclass(frozen=True)
class Paired:
    """The paired difference of one metric (arm minus baseline) over n seeds."""

    n: int
    mean: float
    lo: float  # 95% t-interval; nan when n < 2
    hi: float
    verdict: str

    def as_text(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.4f} (n={self.n}, no interval)"
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_t(arm: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> Paired:
    """Compare `arm` with `baseline` ({seed: value}) on the seeds both have.

    The verdict is "better" when the whole interval lies above 0, "worse" when below, else
    "not distinguishable" (also with fewer than two pairs: no interval can be formed).
    """
    seeds = sorted(set(arm) & set(baseline))
    diffs = [arm[s] - baseline[s] for s in seeds]
    n = len(diffs)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, SAME)
    mean = statistics.fmean(diffs)
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, SAME)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    verdict = BETTER if lo > 0 else WORSE if hi < 0 else SAME
    return Paired(n, mean, lo, hi, verdict)


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) of `values`."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
