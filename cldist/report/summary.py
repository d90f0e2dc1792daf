"""Run summaries: atomic JSON writing and the plain-text / markdown summary tables.

`format_summary_table` is what `cldist run` prints at the end; `format_summary_markdown` and
`format_comparison_markdown` are what `report.md` embeds. All take the metrics dict that a run
writes to `RUN/metrics.json` (keys: method, n_tasks, acc, aaa, forgetting, bwt,
params_per_task, wall_seconds, accuracy_matrix); a missing key shows as "-".
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ..atomic_io import write_json_atomic  # noqa: F401  (re-exported by cldist.report)

SUMMARY_COLUMNS = ["method", "n_tasks", "Acc", "AAA", "forgetting", "BWT", "params/task",
                   "wall time"]
MISSING = "-"


# --------------------------------------------------------------------------- JSON

# --------------------------------------------------------------------------- formatting helpers

def format_duration(seconds: float | None) -> str:
    """Human duration: `12.3s`, `1m20s`, `2h05m`; "-" for None/NaN."""
    if seconds is None or not math.isfinite(float(seconds)):
        return MISSING
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{(whole % 3600) // 60:02d}m"


def format_count(count: float | None) -> str:
    """Compact parameter count: `512`, `12.3k`, `1.20M`, `2.50B`."""
    if count is None:
        return MISSING
    count = float(count)
    for limit, suffix, digits in ((1e9, "B", 2), (1e6, "M", 2), (1e3, "k", 1)):
        if abs(count) >= limit:
            return f"{count / limit:.{digits}f}{suffix}"
    return f"{count:.0f}"


def format_params_per_task(params: int | Sequence[int] | None) -> str:
    """`params_per_task` is one int, or one int per task (shown as their mean when they differ)."""
    if params is None:
        return MISSING
    if isinstance(params, (int, float)):
        return format_count(params)
    values = [float(p) for p in params]
    if not values:
        return MISSING
    if len(set(values)) == 1:
        return format_count(values[0])
    return f"{format_count(sum(values) / len(values))} mean"


def _fmt_number(value: Any, digits: int = 2) -> str:
    if value is None:
        return MISSING
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.{digits}f}" if math.isfinite(number) else MISSING


def summary_row(metrics: Mapping[str, Any]) -> list[str]:
    """One table row (strings, in SUMMARY_COLUMNS order) for a run's metrics dict."""
    return [
        str(metrics.get("method", MISSING)),
        str(metrics.get("n_tasks", len(metrics.get("accuracy_matrix") or []) or MISSING)),
        _fmt_number(metrics.get("acc")),
        _fmt_number(metrics.get("aaa")),
        _fmt_number(metrics.get("forgetting")),
        _fmt_number(metrics.get("bwt")),
        format_params_per_task(metrics.get("params_per_task")),
        format_duration(metrics.get("wall_seconds")),
    ]


def render_plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned, space-separated columns with a dashed rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def render_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; pipes inside cells are escaped."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|"]
                     + [line(r) for r in rows])


def format_accuracy_grid(matrix: Sequence[Sequence[float]], max_tasks: int = 20) -> str:
    """The lower-triangular accuracy matrix as a text grid (rows t = after task t).

    Streams longer than `max_tasks` print a one-line pointer instead: a 100x100 grid is not
    readable in a terminal; report.md has the heatmap.
    """
    n_tasks = len(matrix)
    if n_tasks == 0:
        return "accuracy matrix: (empty)"
    if n_tasks > max_tasks:
        return (f"accuracy matrix: {n_tasks}x{n_tasks}, too large to print; "
                "see metrics.json or report.md")
    cell = 6
    label_width = len(f"t={n_tasks - 1}")
    header = " " * label_width + "".join(f"j={j}".rjust(cell) for j in range(n_tasks))
    lines = ["accuracy matrix R[t][j] (%): row t = after training task t, column j = task j",
             header]
    for t, row in enumerate(matrix):
        cells = "".join(f"{float(v):.1f}".rjust(cell) for v in row)
        lines.append(f"t={t}".ljust(label_width) + cells)
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables

def format_class_il_rules(metrics: Mapping[str, Any]) -> str | None:
    """One line comparing a sub-network method's two Class-IL rules (routed, ensemble): their
    final accuracy, network forwards per test image and the router's task-id accuracy; None for
    runs without them (single-model methods, runs made before routing)."""
    if "acc_ensemble" not in metrics:
        return None
    forwards = metrics.get("forwards_per_image") or {}
    rule = metrics.get("class_il_rule", "ensemble")
    parts = []
    if "acc_routed" in metrics:
        task_id = metrics.get("task_id_acc") or {}
        k = task_id.get("k", "k")
        parts.append(f"routed {_fmt_number(metrics['acc_routed'])} % ({forwards.get('routed', MISSING)} "
                     f"forwards/image; task id top-1 {_fmt_number(task_id.get('top1'), 1)} %, "
                     f"top-{k} {_fmt_number(task_id.get('top_k'), 1)} %)")
    parts.append(f"ensemble {_fmt_number(metrics['acc_ensemble'])} % "
                 f"({forwards.get('ensemble', MISSING)} forwards/image)")
    return f"Class-IL Acc by rule (Acc above: {rule}): " + "; ".join(parts)


def format_summary_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text summary of one run: the metrics table (with both Class-IL rules of a
    sub-network method), then the accuracy matrix grid."""
    parts = [render_plain_table(SUMMARY_COLUMNS, [summary_row(metrics)])]
    rules = format_class_il_rules(metrics)
    if rules:
        parts[0] += "\n" + rules
    matrix = metrics.get("accuracy_matrix")
    if matrix:
        parts.append(format_accuracy_grid(matrix))
    return "\n\n".join(parts)


def format_comparison_table(list_of_metrics: Sequence[Mapping[str, Any]],
                            labels: Sequence[str] | None = None) -> str:
    """Plain-text table with one row per run; `labels` (e.g. run dir names) adds a `run` column."""
    headers, rows = _comparison_rows(list_of_metrics, labels)
    return render_plain_table(headers, rows)


def format_summary_markdown(metrics: Mapping[str, Any]) -> str:
    """The summary table of one run as markdown."""
    return render_markdown_table(SUMMARY_COLUMNS, [summary_row(metrics)])


def format_comparison_markdown(list_of_metrics: Sequence[Mapping[str, Any]],
                               labels: Sequence[str] | None = None) -> str:
    """The comparison table of several runs as markdown."""
    headers, rows = _comparison_rows(list_of_metrics, labels)
    return render_markdown_table(headers, rows)


def _comparison_rows(list_of_metrics: Sequence[Mapping[str, Any]],
                     labels: Sequence[str] | None) -> tuple[list[str], list[list[str]]]:
    rows = [summary_row(m) for m in list_of_metrics]
    if labels is None:
        return list(SUMMARY_COLUMNS), rows
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} runs")
    return ["run"] + SUMMARY_COLUMNS, [[str(label)] + row for label, row in zip(labels, rows)]


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"trainer": {"epochs": 2}}` -> `{"trainer.epochs": 2}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
