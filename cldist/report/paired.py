"""Paired differences against a reference configuration, seed by seed.

The same seed gives every method the same data order and initial draws, so much of the spread
between seeds is shared; differences taken seed by seed against a reference configuration
(`sweep.baseline=`) are far tighter than the two means' standard deviations suggest. For each
metric: the difference per seed, their mean ± sample standard deviation, the paired t statistic
t = mean / (sd / sqrt(n)) (n - 1 degrees of freedom), and on how many seeds the configuration is
better (higher accuracy, lower forgetting). This is the table docs/RESULTS.md used to build by
hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from cldist.report.document import Section, Table
from cldist.report.report import mean_std

# (metrics.json key, column heading, whether higher is better)
PAIRED_METRICS = (("acc", "Class-IL Acc", True), ("aaa", "AAA", True),
                  ("task_il_acc", "Task-IL Acc", True),
                  ("task_il_forgetting", "Task-IL forgetting", False))


@dataclass
class PairedComparison:
    """One configuration against the reference: (seed, its metrics, the reference's metrics)
    for every seed both finished."""
    label: str
    pairs: list[tuple[Any, Mapping[str, Any], Mapping[str, Any]]] = field(default_factory=list)


@dataclass
class PairedStats:
    diffs: list[float]
    mean: float
    sd: float | None     # None with one pair
    t: float | None      # None with one pair, or when every difference is the same
    better: int          # pairs where the configuration is better
    n: int


def paired_stats(diffs: Sequence[float], higher_is_better: bool = True) -> PairedStats:
    """Mean, sample sd and paired t of `diffs` (configuration - reference), and the count of
    pairs on the better side (a tie is not better)."""
    diffs = [float(d) for d in diffs]
    if not diffs:
        raise ValueError("paired_stats needs at least one difference")
    mean, sd = mean_std(diffs)
    t = None
    if sd is not None and sd > 0:
        t = mean / (sd / math.sqrt(len(diffs)))
    better = sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))
    return PairedStats(diffs, mean, sd, t, better, len(diffs))


def _signed(value: float) -> str:
    return f"{value:+.1f}"


def format_paired(stats: PairedStats) -> str:
    """`+5.2 ± 4.4 (t 2.64)`; `+5.2` for a single pair."""
    if stats.sd is None:
        return _signed(stats.mean)
    t = "" if stats.t is None else f" (t {stats.t:.2f})"
    return f"{_signed(stats.mean)} ± {stats.sd:.1f}{t}"


def _values(comparison: PairedComparison, key: str) -> tuple[list[Any], list[float]] | None:
    seeds, diffs = [], []
    for seed, ours, ref in comparison.pairs:
        a, b = ours.get(key), ref.get(key)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) \
                or not math.isfinite(a) or not math.isfinite(b):
            return None  # a run without this metric (an older cldist): no column for it
        seeds.append(seed)
        diffs.append(float(a) - float(b))
    return (seeds, diffs) if diffs else None


def paired_table(comparisons: Sequence[PairedComparison], reference: str,
                 metrics=PAIRED_METRICS) -> Table:
    """Rows `configuration - reference`: the first metric's difference per seed, then for
    every metric `mean ± sd (t)` and `better k/n`."""
    first_key, first_name, _ = metrics[0]
    headers = [f"configuration - {reference}", "seeds", f"{first_name} per seed"]
    for _, name, _ in metrics:
        headers += [f"{name} mean ± sd (t)", "better"]
    rows = []
    for comparison in comparisons:
        first = _values(comparison, first_key)
        seeds = "/".join(str(s) for s, _, _ in comparison.pairs) or "-"
        row = [comparison.label, seeds,
               " / ".join(_signed(d) for d in first[1]) if first else "-"]
        for key, _, higher in metrics:
            values = _values(comparison, key)
            if values is None:
                row += ["-", "-"]
                continue
            stats = paired_stats(values[1], higher)
            row += [format_paired(stats), f"{stats.better}/{stats.n}"]
        rows.append(row)
    return Table(headers, rows)


def paired_section(comparisons: Sequence[PairedComparison], reference: str) -> Section:
    n = sorted({len(c.pairs) for c in comparisons})
    dof = "" if n != [n[0]] or n[0] < 2 else \
        f" ({n[0] - 1} degrees of freedom: |t| > {_T_CRITICAL.get(n[0] - 1, 1.96):.2f} is " \
        f"p < 0.05 two-sided)"
    caption = (f"Paired by seed against {reference}: the difference on each seed (the "
               f"configuration minus {reference}, in percentage points), the mean ± sample "
               f"standard deviation of the differences with the paired t statistic "
               f"t = mean / (sd / sqrt(n)){dof}, and on how many seeds the configuration is "
               f"better (higher accuracy, lower forgetting). Seeds where either run did not "
               f"finish are left out.")
    return Section(f"Paired differences against {reference}", caption,
                   table=paired_table(comparisons, reference))


# two-sided 5 % critical values of Student's t by degrees of freedom (no scipy needed)
_T_CRITICAL = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
               10: 2.23, 11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 19: 2.09, 29: 2.05}
