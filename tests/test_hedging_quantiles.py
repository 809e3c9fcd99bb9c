"""The hedger's quantiles: close to the exact ones, and bounded work per sample (#25, 10)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tensorferry.daemon.fetch.hedging import MIN_SAMPLES, _Quantile


def exact(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


DISTRIBUTIONS: dict[str, Callable[[random.Random], float]] = {
    # Range times of a healthy load, a load with stragglers, and first bytes off a busy store.
    "lognormal": lambda r: r.lognormvariate(-1.0, 0.5),
    "bimodal": lambda r: r.uniform(0.05, 0.08) if r.random() < 0.85 else r.uniform(2.0, 9.0),
    "uniform": lambda r: r.uniform(0.001, 30.0),
}


@pytest.mark.parametrize("q", [0.5, 0.9])
@pytest.mark.parametrize("shape", DISTRIBUTIONS)
def test_the_quantile_is_within_a_bucket_of_the_exact_one(shape: str, q: float) -> None:
    r = random.Random(f"{shape}-{q}")
    draw = DISTRIBUTIONS[shape]
    estimate = _Quantile(q)
    samples: list[float] = []
    for n in range(1, 5001):
        x = draw(r)
        samples.append(x)
        estimate.add(x)
        if n >= MIN_SAMPLES and (n <= 64 or n % 97 == 0):
            want = exact(samples, q)
            # Never below the exact quantile (no hedge comes sooner for it), and close
            # enough for deadlines at 4x the quantile.
            assert want <= estimate.value <= want * 1.05, f"{n} samples: exact {want}"
    assert estimate.count == 5000


def test_few_distinct_times_give_the_exact_quantile() -> None:
    estimate = _Quantile(0.5)
    for x in (0.3, 0.3, 0.3, 0.3, 0.3, 0.6, 0.6, 0.6, 0.6):
        estimate.add(x)
    assert estimate.value == 0.3
    for _ in range(10):
        estimate.add(0.6)
    assert estimate.value == 0.6


class Counted(float):
    """A sample that counts the comparisons made with it: sorting them, or any other work
    that grows with the samples so far, shows in the count."""

    comparisons = 0

    def _count(self, other: object, result: bool) -> bool:
        Counted.comparisons += 1
        return result

    def __lt__(self, other: float) -> bool:
        return self._count(other, float(self) < other)

    def __gt__(self, other: float) -> bool:
        return self._count(other, float(self) > other)

    def __le__(self, other: float) -> bool:
        return self._count(other, float(self) <= other)

    def __ge__(self, other: float) -> bool:
        return self._count(other, float(self) >= other)


def test_a_sample_costs_a_few_comparisons_however_many_came_before() -> None:
    r = random.Random(25)
    estimate = _Quantile(0.9)

    def comparisons_per_sample(n: int) -> float:
        before = Counted.comparisons
        for _ in range(n):
            estimate.add(Counted(r.lognormvariate(-1.0, 0.5)))
            estimate.value  # noqa: B018 - a read after each sample, as the hedger does
        return (Counted.comparisons - before) / n

    early = comparisons_per_sample(1000)
    for _ in range(20_000):
        estimate.add(r.lognormvariate(-1.0, 0.5))
    late = comparisons_per_sample(1000)
    # Sorting every sample so far every 16 samples costs about n * log2(n) / 16
    # comparisons a sample (at n = 20k: 18k); the histogram makes one or two.
    assert max(early, late) <= 4, f"comparisons per sample: {early} early, {late} late"
    # Memory is fixed: no sample is kept.
    sizes = [len(v) for v in vars(estimate).values() if isinstance(v, list)]
    assert max(sizes) <= 1024, f"the estimator keeps lists of {sizes} items"
