"""How sure the report is: intervals over seeds, the test set's own noise, and verdicts.

- `over_seeds(xs)`: mean, standard deviation and the 95% t-interval of the mean over seeds.
- `wilson(k, n)`: the 95% Wilson interval of an accuracy of k right out of n test images;
  the noise a finite test set adds to one run's number, whatever the seed.
- `paired(a, b)`: the difference a - b, seed by seed, with its t-interval. Runs of one seed
  share the test set and little else (other starting weights, micro-batches, augmentation
  draws), so pairing removes little noise; the interval is still honest.
- `mcnemar(a, b)` / `image_verdict(t)`: with one seed, two models compared image by image on the
  test set (McNemar's exact test: a binomial test of the images only one of them gets right).
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
    sd: float  # sample standard deviation over seeds (nan for one seed)
    lo: float  # 95% t-interval of the mean (nan for one seed)
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
        return (
            f"{m} ± {self.sd * scale:.{digits}f} (95% CI {self.lo * scale:.{digits}f}–"
            f"{self.hi * scale:.{digits}f}, {self.n} seeds)"
        )


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
    word: str  # holds | does not hold | inconclusive
    why: str  # one clause: the interval, and for inconclusive what would resolve it


def verdict(diff: Interval, scale: float = 100, unit: str = " points") -> Verdict:
    """The claim is that the difference is > 0."""
    if diff.n == 0:
        return Verdict(INCONCLUSIVE, "no runs to compare")
    if diff.n == 1:
        return Verdict(
            INCONCLUSIVE,
            f"one seed ({diff.mean * scale:+.1f}{unit}) has no spread to judge it by; run at least 2 seeds",
        )
    span = f"95% CI of the difference {diff.lo * scale:+.1f} to {diff.hi * scale:+.1f}{unit}"
    if diff.lo > 0:
        return Verdict(HOLDS, f"{span}, above zero")
    if diff.hi <= 0:
        return Verdict(DOES_NOT_HOLD, f"{span}, at or below zero")
    need = seeds_to_resolve(diff)
    more = (
        f"about {need} seeds would resolve it at this spread"
        if need
        else "no number of seeds would resolve it at a mean difference of zero"
    )
    return Verdict(INCONCLUSIVE, f"{span} straddles zero; {more}")


def within_noise(change: float, interval: Interval) -> bool:
    """A change of a seed-averaged result that the seeds' own interval already spans."""
    return interval.n >= 2 and not math.isnan(interval.half_width) and abs(change) <= interval.half_width


# ---------------------------------------------------------------------------------------
# One seed: a per-image paired test on the test set


@dataclass(frozen=True)
class PairedImages:
    """Two models scored on the same test images: `a_only` images only model a gets right,
    `b_only` only model b; the rest (both right, both wrong) are ties and carry no evidence
    about which is better. `p` is McNemar's exact two-sided p-value (a binomial test of the
    discordant images at 1/2); `lo`..`hi` the 95% Wald interval of the paired accuracy
    difference (a - b), for its size."""

    n: int
    a_only: int
    b_only: int
    p: float

    @property
    def diff(self) -> float:
        return (self.a_only - self.b_only) / self.n if self.n else math.nan

    @property
    def half_width(self) -> float:
        if not self.n:
            return math.nan
        z = float(st.norm.ppf(0.5 + CONFIDENCE / 2))
        discordant = self.a_only + self.b_only
        return z * math.sqrt(max(discordant - (self.a_only - self.b_only) ** 2 / self.n, 0.0)) / self.n

    @property
    def lo(self) -> float:
        return self.diff - self.half_width

    @property
    def hi(self) -> float:
        return self.diff + self.half_width


MCNEMAR = "McNemar's exact test"


def mcnemar(a_correct, b_correct) -> PairedImages:
    """McNemar's exact test of two models' per-image correctness on the same images (in the
    same order). No discordant image (the models agree everywhere): p = 1, no evidence."""
    a, b = [bool(x) for x in a_correct], [bool(x) for x in b_correct]
    if len(a) != len(b):
        raise ValueError(f"paired images need the same test set ({len(a)} vs {len(b)} images)")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    k = a_only + b_only
    p = 1.0 if k == 0 else float(st.binomtest(a_only, k, 0.5, alternative="two-sided").pvalue)
    return PairedImages(len(a), a_only, b_only, p)


def image_verdict(
    t: PairedImages, first: str = "the first", second: str = "the second", alpha: float = 1 - CONFIDENCE
) -> Verdict:
    """The claim is that model a (`first`) is more accurate than model b (`second`) on these
    test images' population."""
    if t.n == 0:
        return Verdict(INCONCLUSIVE, "no test images to compare")
    span = (
        f"{MCNEMAR} on {t.n} test images: {t.a_only} right only by {first}, {t.b_only} only by "
        f"{second}, p = {t.p:.2g}; difference {100 * t.diff:+.1f} points, 95% CI {100 * t.lo:+.1f} to "
        f"{100 * t.hi:+.1f}"
    )
    if t.p < alpha:
        return Verdict(HOLDS if t.a_only > t.b_only else DOES_NOT_HOLD, span)
    return Verdict(INCONCLUSIVE, f"{span}: not below {alpha:g}")


def spread(xs) -> tuple[float, float, float]:
    """Median, lowest and highest of the finite values (inf counts: a seed that never got there)."""
    xs = sorted(float(x) for x in xs if x is not None and not math.isnan(float(x)))
    if not xs:
        return (math.nan, math.nan, math.nan)
    mid = (len(xs) - 1) / 2
    return ((xs[int(mid)] + xs[int(mid + 0.5)]) / 2, xs[0], xs[-1])


def bootstrap_sum(
    vectors, signs, resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """A signed sum of accuracies of models scored on the same test images, with its paired
    percentile-bootstrap interval: the images are resampled together for every model."""
    import numpy as np

    m = np.asarray(vectors, dtype=np.float64)  # models x images
    w = np.asarray(signs, dtype=np.float64)
    per_image = w @ m  # each image's contribution to the sum
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m.shape[1], size=(resamples, m.shape[1]))
    sums = per_image[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(per_image.mean()), float(np.quantile(sums, tail)), float(np.quantile(sums, 1 - tail))


# ---------------------------------------------------------------------------------------
# Several sources of noise at once, and many comparisons


def hierarchical_bootstrap(
    a, b, resamples: int = 4000, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float, float, float]:
    """Accuracy of arm a minus arm b, with an interval that holds every level of noise the runs
    have: `a` and `b` are nested lists [pretraining run][training seed][test image] of 0/1
    (an arm without pretraining is one group). Each resample draws the test images once, with
    replacement, for both arms (the same images score both: paired), then per arm the
    pretraining runs with replacement and, within each drawn run, its seeds with replacement.
    Returns (observed difference, lo, hi, two-sided bootstrap p of 'no difference')."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arms = [[np.asarray(g, dtype=np.float64) for g in arm] for arm in (a, b)]  # per group: seeds x images
    n_images = arms[0][0].shape[1]
    images = rng.integers(0, n_images, size=(resamples, n_images))
    # per group and resample, each seed's accuracy on the drawn images: seeds x resamples
    per_seed = [[g[:, images].mean(axis=2) for g in arm] for arm in arms]
    means = []
    for arm in per_seed:
        groups = rng.integers(0, len(arm), size=(resamples, len(arm)))
        total = np.zeros(resamples)
        for j in range(len(arm)):
            acc = np.zeros(resamples)
            for k, g in enumerate(arm):  # the drawn group's seeds, drawn with replacement
                rows = rng.integers(0, g.shape[0], size=(resamples, g.shape[0]))
                pick = np.take_along_axis(g.T, rows, axis=1).mean(axis=1)
                acc = np.where(groups[:, j] == k, pick, acc)
            total += acc
        means.append(total / len(arm))
    diffs = means[0] - means[1]
    observed = float(np.mean([g.mean() for g in arms[0]]) - np.mean([g.mean() for g in arms[1]]))
    tail = (1 - confidence) / 2
    p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
    return observed, float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail)), p


def t_p_value(diff: Interval) -> float:
    """Two-sided p of a one-sample t-test of 'mean difference 0' over seeds (nan for one seed)."""
    if diff.n < 2 or math.isnan(diff.sd):
        return math.nan
    if diff.sd == 0:
        return 0.0 if diff.mean else 1.0
    t = diff.mean / (diff.sd / math.sqrt(diff.n))
    return float(2 * st.t.sf(abs(t), diff.n - 1))


def holm(ps: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: each p multiplied by the number of hypotheses not yet
    rejected, kept monotone, capped at 1. A family of comparisons then keeps its chance of any
    false 'holds' or 'does not hold' at alpha. nan p-values are left out and come back nan."""
    known = sorted(((p, k) for k, p in ps.items() if not math.isnan(p)))
    out, running = {k: math.nan for k in ps}, 0.0
    for i, (p, k) in enumerate(known):
        running = max(running, min(1.0, (len(known) - i) * p))
        out[k] = running
    return out
