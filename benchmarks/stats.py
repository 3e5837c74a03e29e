"""The statistics of the benchmark report: t-tests over seeds and least-squares fits with R², in
plain Python.

    paired(a, b)   # runs of two rows with the same seeds: mean difference a - b, its 95% CI and
                   # two-sided p
    welch(a, b)    # any two groups of runs: the same, without pairing (Welch's unequal-variance
                   # t-test)
    fit_line(x, y) # y = slope * x + intercept, with R²

The Student t distribution comes from the regularized incomplete beta function (a continued
fraction), so the report needs no scipy; tests/test_benchmark.py checks it against tabulated
critical values.
"""

import math
import statistics
from dataclasses import dataclass


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, from its continued fraction (modified
    Lentz)."""
    if x <= 0 or x >= 1:
        return min(max(x, 0.0), 1.0)
    # the fraction converges fast below this point; use the symmetry above it
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))

    def guard(v: float) -> float:
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 400):
        # the even, then the odd term
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return front * h / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (p > 0.5), by bisection on the two-sided tail."""
    tail = 2 * (1 - p)
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, df) > tail else (low, mid)
    return (low + high) / 2


@dataclass
class Comparison:
    """a - b: the mean difference, its 95% confidence interval and the two-sided p of a t-test (nan:
    untestable)."""

    diff: float
    low: float
    high: float
    p: float
    n: int
    test: str

    def text(self, digits: int = 3) -> str:
        """`+0.012 [-0.004, +0.028], p 0.12` (or the difference alone, when no test is possible)."""
        if math.isnan(self.p):
            return f"{self.diff:+.{digits}f} (n = {self.n}: no test)"
        return (f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}], "
                f"p {format_p(self.p)}")


def format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def _t_interval(diff: float, se: float, df: float, n: int, test: str) -> Comparison:
    if not df > 0:
        return Comparison(diff, math.nan, math.nan, math.nan, n, test)
    if not se > 0:  # no spread at all: t is 0 / 0 (no difference) or infinite
        return Comparison(diff, diff, diff, 1.0 if diff == 0 else 0.0, n, test)
    half = t_quantile(0.975, df) * se
    return Comparison(diff, diff - half, diff + half, t_two_sided_p(diff / se, df), n, test)


def paired(a: dict, b: dict) -> Comparison:
    """Paired t-test of a - b over the seeds both have ({seed: value} each): runs of two rows with
    one seed share the base model, the prompt order and the evaluation prompts."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return Comparison(diffs[0] if diffs else math.nan, math.nan, math.nan, math.nan,
                          len(diffs), "paired t")
    return _t_interval(statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)),
                       len(diffs) - 1, len(diffs), "paired t")


def welch(a: list[float], b: list[float]) -> Comparison:
    """Welch's t-test of mean(a) - mean(b) (unequal variances, Welch-Satterthwaite degrees of
    freedom)."""
    diff = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff, math.nan, math.nan, math.nan, min(len(a), len(b)), "Welch t")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = ((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0
          else len(a) + len(b) - 2)
    return _t_interval(diff, se, df, min(len(a), len(b)), "Welch t")


@dataclass
class Fit:
    slope: float
    intercept: float
    r2: float
    n: int


def fit_line(x: list[float], y: list[float]) -> Fit:
    """Least squares y = slope * x + intercept; R² = 1 - residual / total sum of squares (nan for
    constant y)."""
    if len(x) < 2:
        return Fit(math.nan, math.nan, math.nan, len(x))
    x_mean, y_mean = statistics.mean(x), statistics.mean(y)
    sxx = sum((xi - x_mean) ** 2 for xi in x)
    syy = sum((yi - y_mean) ** 2 for yi in y)
    slope = sum((xi - x_mean) * (yi - y_mean) for xi, yi in zip(x, y)) / sxx if sxx > 0 else 0.0
    intercept = y_mean - slope * x_mean
    residual = sum((yi - slope * xi - intercept) ** 2 for xi, yi in zip(x, y))
    return Fit(slope, intercept, 1 - residual / syy if syy > 0 else math.nan, len(x))


def fit_entropy_law(entropy: list[float], accuracy: list[float]) -> Fit:
    """R = -a exp(H) + b as a line in exp(H): returns Fit(slope = -a, intercept = b, R²)."""
    return fit_line([math.exp(h) for h in entropy], accuracy)
