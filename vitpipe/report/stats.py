"""How sure the report is: intervals over seeds, the test set's own noise, and verdicts.

- `over_seeds(xs)`: mean, standard deviation and the 95% t-interval of the mean over seeds.
- `wilson(k, n)`: the 95% Wilson interval of an accuracy of k right out of n test images;
  the noise a finite test set adds to one run's number, whatever the seed.
- `paired(a, b)`: the difference a - b, seed by seed (the same seed gives both runs the same
  data order), with its t-interval: the noise both share cancels out.
- `verdict(diff)`: *holds* when the interval of the difference lies above zero (the claimed
  side), *does not hold* when it lies at or below zero, *inconclusive* when it straddles
  zero, with the number of seeds that would resolve it at the observed spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as st

CONFIDENCE = 0.95
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Interval:
    mean: float
    sd: float        # sample standard deviation over seeds (nan for one seed)
    lo: float        # 95% t-interval of the mean (nan for one seed)
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def fmt(self, scale: float = 100, digits: int = 1, unit: str = "%") -> str:
        """'66.0% ± 2.1 (95% CI 61.2–70.8, 3 seeds)', or the one value and '1 seed'."""
        m = f"{self.mean * scale:.{digits}f}{unit}"
        if self.n < 2:
            return f"{m} (1 seed: no interval)"
        return (f"{m} ± {self.sd * scale:.{digits}f} (95% CI {self.lo * scale:.{digits}f}–"
                f"{self.hi * scale:.{digits}f}, {self.n} seeds)")


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    return float(st.t.ppf(0.5 + confidence / 2, n - 1))


def over_seeds(xs, confidence: float = CONFIDENCE) -> Interval:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    if not xs:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    n, mean = len(xs), sum(xs) / len(xs)
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n, confidence) * sd / math.sqrt(n)
    return Interval(mean, sd, mean - half, mean + half, n)


def paired(a, b, confidence: float = CONFIDENCE) -> Interval:
    """a - b seed by seed; a and b are lists in the same seed order."""
    if len(a) != len(b):
        raise ValueError(f"paired runs need the same seeds ({len(a)} vs {len(b)})")
    return over_seeds([x - y for x, y in zip(a, b)], confidence)


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    if n <= 0:
        return (math.nan, math.nan)
    z = float(st.norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def seeds_to_resolve(diff: Interval, confidence: float = CONFIDENCE, cap: int = 1000) -> int | None:
    """The fewest seeds whose t-interval, at the observed mean and spread, excludes zero.
    None when it cannot be estimated (one seed, or a mean difference of zero)."""
    if diff.n < 2 or diff.mean == 0 or math.isnan(diff.sd):
        return None
    if diff.sd == 0:
        return diff.n
    for n in range(2, cap + 1):
        if t_quantile(n, confidence) * diff.sd / math.sqrt(n) < abs(diff.mean):
            return n
    return None


@dataclass(frozen=True)
class Verdict:
    word: str        # holds | does not hold | inconclusive
    why: str         # one clause: the interval, and for inconclusive what would resolve it


def verdict(diff: Interval, scale: float = 100, unit: str = " points") -> Verdict:
    """The claim is that the difference is > 0."""
    if diff.n == 0:
        return Verdict(INCONCLUSIVE, "no runs to compare")
    if diff.n == 1:
        return Verdict(INCONCLUSIVE, f"one seed ({diff.mean * scale:+.1f}{unit}) has no spread to judge it by; "
                                     f"run at least 2 seeds")
    span = f"95% CI of the difference {diff.lo * scale:+.1f} to {diff.hi * scale:+.1f}{unit}"
    if diff.lo > 0:
        return Verdict(HOLDS, f"{span}, above zero")
    if diff.hi <= 0:
        return Verdict(DOES_NOT_HOLD, f"{span}, at or below zero")
    need = seeds_to_resolve(diff)
    more = (f"about {need} seeds would resolve it at this spread" if need
            else "no number of seeds would resolve it at a mean difference of zero")
    return Verdict(INCONCLUSIVE, f"{span} straddles zero; {more}")


def within_noise(change: float, interval: Interval) -> bool:
    """A change of a seed-averaged result that the seeds' own interval already spans."""
    return interval.n >= 2 and not math.isnan(interval.half_width) and abs(change) <= interval.half_width
