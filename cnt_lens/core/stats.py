"""Rates with their sample size and a 95% interval: every rate cnt_lens reports goes through :func:`rate`.

A block of evaluation numbers carries, for each rate ``name``, three keys: ``name`` (the share, a
float), ``name_n`` (how many items it was counted over) and ``name_ci95`` (``[low, high]``, the
Wilson score interval). A mean over items (e.g. a KL divergence per prompt, :func:`mean`) carries the
same three keys, its interval a percentile bootstrap. Constraints and searches read the float; tables
and reports show all three.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

__all__ = ["bootstrap_interval", "format_rate", "is_companion", "mean", "rate", "wilson_interval"]



def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% by default); ``(nan, nan)`` when ``n == 0``.

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0/n and n/n, where small
    evaluation splits often sit.

    Example:
        >>> tuple(round(x, 3) for x in wilson_interval(0, 24))
        (0.0, 0.138)
    """
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(name: str, flags: Iterable[Any], *, scale: float = 1.0) -> dict[str, Any]:
    """``{name: share, name_n: n, name_ci95: [lo, hi]}`` of the true ``flags`` (all times ``scale``, e.g. 100 for %).

    Example:
        >>> rate("refusal_harmful", [True, False, True, True])["refusal_harmful_n"]
        4
    """
    flags = [bool(f) for f in flags]
    n, k = len(flags), sum(flags)
    lo, hi = wilson_interval(k, n)
    return {name: scale * k / n if n else float("nan"), f"{name}_n": n, f"{name}_ci95": [scale * lo, scale * hi]}


def bootstrap_interval(values: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``; ``(nan, nan)`` when there are none.

    ``resamples`` means of ``len(values)`` draws with replacement, seeded, so the same values always
    give the same interval.

    Example:
        >>> bootstrap_interval([0.5, 0.5, 0.5])
        (0.5, 0.5)
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * (resamples - 1))], means[int(round((1 - tail) * (resamples - 1)))]


def mean(name: str, values: Iterable[float]) -> dict[str, Any]:
    """``{name: mean, name_n: n, name_ci95: [lo, hi]}`` of ``values`` (:func:`bootstrap_interval`).

    Example:
        >>> mean("kl_first_token", [0.0, 0.0])
        {'kl_first_token': 0.0, 'kl_first_token_n': 2, 'kl_first_token_ci95': [0.0, 0.0]}
    """
    values = [float(v) for v in values]
    lo, hi = bootstrap_interval(values)
    return {name: sum(values) / len(values) if values else float("nan"), f"{name}_n": len(values),
            f"{name}_ci95": [lo, hi]}


def is_companion(key: str) -> bool:
    """Whether ``key`` is the ``_n`` or ``_ci95`` companion of a rate (not a number to tabulate on its own)."""
    return key.endswith("_n") or key.endswith("_ci95")


def format_rate(block: dict[str, Any], name: str, digits: int = 3) -> str:
    """``name``'s value in ``block`` as text: ``"0.417 [0.24, 0.61] n=24"`` for a rate, ``"3.686"`` for a number.

    An interval is shown to 2 places (1 for a percentage), to 3 when it lies below 0.1 (a small KL).

    Example:
        >>> format_rate(rate("r", [1, 0, 0, 0]), "r")
        '0.250 [0.05, 0.70] n=4'
    """
    v = block.get(name)
    if not isinstance(v, float):
        return "" if v is None else str(v)
    ci, n = block.get(f"{name}_ci95"), block.get(f"{name}_n")
    text = f"{v:.{digits}f}"
    if ci and n is not None:
        d = 3 if 0 <= ci[0] <= ci[1] < 0.1 and v > 0 else 2 if abs(v) <= 1 else 1
        text += f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}] n={n}"
    return text
