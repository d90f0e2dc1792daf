"""Markdown reports with plots, built from a finished run directory.

`write_report(RUN)` reads `RUN/metrics.json` and writes `RUN/report.md` and `RUN/plots/*.png`.
`write_comparison([RUN_A, RUN_B, ...], OUT.md)` writes one table and overlaid accuracy curves.

metrics.json keys used: acc, aaa, forgetting, bwt, accuracy_matrix, n_tasks, method,
params_per_task (int, or one int per task), wall_seconds; optional: ranks
({task_id: {layer: rank}}), eval_seconds_per_image (one per task), avg_acc_curve and
forgetting_per_task (recomputed from the matrix when absent; the curve uses `n_test`, the
per-task test sizes, when that key is present), and scenario/backbone/seed for the header.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from cldist.errors import UserError
from cldist.eval.metrics import summarize, validate_matrix
from cldist.report import plots
from cldist.report.summary import (
    format_comparison_markdown,
    format_count,
    format_summary_markdown,
    render_markdown_table,
)

REQUIRED_KEYS = ("acc", "aaa", "forgetting", "bwt", "accuracy_matrix", "n_tasks", "method",
                 "params_per_task", "wall_seconds")
HEADER_KEYS = ("scenario", "backbone", "seed")
# A markdown grid of the matrix is readable up to about this many tasks; the heatmap always is.
MAX_MARKDOWN_MATRIX_TASKS = 12


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """Read and check `RUN/metrics.json`; a missing file or key is a UserError naming it."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found: the run has not finished. Finish it with "
            f"`cldist resume {run_dir}`, or pass a finished run directory.")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); re-create it with "
                        f"`cldist eval {run_dir}`") from error
    missing = [key for key in REQUIRED_KEYS if key not in metrics]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; re-create it with "
                        f"`cldist eval {run_dir}`")
    try:
        validate_matrix(metrics["accuracy_matrix"])
    except ValueError as error:
        raise UserError(f"{path}: {error}") from error
    return metrics


def derived_curves(metrics: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(average-accuracy curve, forgetting per task), taken from metrics.json when stored."""
    computed = summarize(metrics["accuracy_matrix"], metrics.get("n_test"))
    curve = metrics.get("avg_acc_curve") or computed["avg_acc_curve"]
    forgetting = metrics.get("forgetting_per_task")
    if forgetting is None:
        forgetting = computed["forgetting_per_task"]
    return [float(v) for v in curve], [float(v) for v in forgetting]


def params_list(params_per_task: int | Sequence[int], n_tasks: int) -> list[int]:
    """`params_per_task` as one value per task (a single int means the same for every task)."""
    if isinstance(params_per_task, (int, float)):
        return [int(params_per_task)] * n_tasks
    return [int(p) for p in params_per_task]


def write_report(run_dir: str | Path) -> Path:
    """Write `RUN/report.md` and its figures under `RUN/plots/`; return the report's path."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    plot_dir = run_dir / "plots"
    matrix = metrics["accuracy_matrix"]
    n_tasks = len(matrix)
    curve, forgetting = derived_curves(metrics)
    method = str(metrics["method"])

    sections: list[str] = []

    def figure_section(heading: str, png: Path, caption: str) -> None:
        relative = png.relative_to(run_dir).as_posix()
        sections.append(f"## {heading}\n\n{caption}\n\n![{heading}]({relative})\n")

    figure_section(
        "Accuracy matrix",
        plots.plot_accuracy_matrix(matrix, plot_dir / "accuracy_matrix.png",
                                   title=f"{method}: accuracy matrix R[t][j] (%)"),
        "R[t][j] = accuracy on task j's test data after training task t.")
    if n_tasks <= MAX_MARKDOWN_MATRIX_TASKS:
        sections[-1] += "\n" + _matrix_markdown(matrix) + "\n"

    figure_section(
        "Average accuracy",
        plots.plot_average_accuracy({method: curve}, plot_dir / "avg_accuracy.png"),
        "Accuracy over all seen classes after each task; AAA is the mean of this curve.")

    figure_section(
        "Forgetting",
        plots.plot_forgetting(forgetting, plot_dir / "forgetting.png"),
        "forgetting_j = max over t < T-1 of R[t][j] - R[T-1][j], for every old task j.")

    if metrics.get("ranks"):
        figure_section(
            "Ranks",
            plots.plot_rank_heatmap(metrics["ranks"], plot_dir / "ranks.png"),
            "LoRA rank chosen for each adapted layer (rows) and task (columns).")

    params = params_list(metrics["params_per_task"], n_tasks)
    figure_section(
        "Parameters",
        plots.plot_params_per_task(params, plot_dir / "params.png"),
        f"Trainable parameters added per task (bars) and in total (line): "
        f"{format_count(sum(params))} over {len(params)} tasks.")

    if metrics.get("eval_seconds_per_image"):
        figure_section(
            "Inference cost",
            plots.plot_eval_time(metrics["eval_seconds_per_image"],
                                 plot_dir / "eval_time.png"),
            "Evaluation time per test image after each task.")

    header = [f"# cldist report: {method}, {metrics['n_tasks']} tasks", ""]
    details = [f"- {key}: {metrics[key]}" for key in HEADER_KEYS if key in metrics]
    if details:
        header += details + [""]
    header += ["## Summary", "", format_summary_markdown(metrics), ""]
    text = "\n".join(header) + "\n" + "\n".join(sections)
    return _write_text_atomic(run_dir / "report.md", text)


def write_comparison(run_dirs: Sequence[str | Path], out_path: str | Path) -> Path:
    """One markdown table over several runs plus their overlaid average-accuracy curves.

    The figure goes to `plots/{out stem}_avg_accuracy.png` next to `out_path`. Runs are
    labelled by their directory names (methods may repeat across runs).
    """
    if not run_dirs:
        raise UserError("write_comparison needs at least one run directory")
    out_path = Path(out_path)
    runs = [(Path(d), load_metrics(d)) for d in run_dirs]
    labels = _unique_labels([d for d, _ in runs])
    curves = {f"{m['method']} ({label})": derived_curves(m)[0]
              for label, (_, m) in zip(labels, runs)}
    png = plots.plot_average_accuracy(
        curves, out_path.parent / "plots" / f"{out_path.stem}_avg_accuracy.png",
        title="Average accuracy over seen classes")
    relative_png = os.path.relpath(png, out_path.parent).replace(os.sep, "/")
    sources = "\n".join(f"- {label}: `{d}`" for label, (d, _) in zip(labels, runs))
    text = "\n".join([
        f"# cldist comparison: {len(runs)} runs",
        "",
        format_comparison_markdown([m for _, m in runs], labels=labels),
        "",
        "## Average accuracy",
        "",
        f"![Average accuracy]({relative_png})",
        "",
        "## Runs",
        "",
        sources,
        "",
    ])
    return _write_text_atomic(out_path, text)


def _unique_labels(run_dirs: Sequence[Path]) -> list[str]:
    # Directory names, made unique with their parent when two runs share a name.
    names = [d.resolve().name for d in run_dirs]
    return [f"{d.resolve().parent.name}/{name}" if names.count(name) > 1 else name
            for d, name in zip(run_dirs, names)]


def _matrix_markdown(matrix: Sequence[Sequence[float]]) -> str:
    n_tasks = len(matrix)
    headers = ["after task"] + [f"task {j}" for j in range(n_tasks)]
    rows = [[str(t)] + [f"{float(v):.1f}" for v in row] + [""] * (n_tasks - len(row))
            for t, row in enumerate(matrix)]
    return render_markdown_table(headers, rows)


def _write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
