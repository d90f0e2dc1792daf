"""The report's figures, drawn with matplotlib's Agg renderer into PNG files.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never through
pyplot, so plotting neither needs a display nor changes any global backend (safe from
threads and inside other programs). Every function writes one PNG and returns its path.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
# Beyond these sizes numbers inside heatmap cells become unreadable; colour alone remains.
MAX_ANNOTATED_TASKS = 20
MAX_ANNOTATED_CELLS = 400


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _task_ticks(axis, n_tasks: int, which: str = "x") -> None:
    """Integer task ticks, thinned on long streams."""
    step = max(1, math.ceil(n_tasks / 20))
    ticks = list(range(0, n_tasks, step))
    if which == "x":
        axis.set_xticks(ticks)
    else:
        axis.set_yticks(ticks)


def natural_key(text: str) -> list:
    """Sort key so `blocks.2.attn` comes before `blocks.10.attn`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


# --------------------------------------------------------------------------- figures

def plot_accuracy_matrix(matrix: Sequence[Sequence[float]], path: str | Path,
                         title: str = "Accuracy matrix R[t][j] (%)") -> Path:
    """Heatmap of the lower-triangular accuracy matrix, numbers in the cells for short streams."""
    n_tasks = len(matrix)
    grid = np.full((n_tasks, n_tasks), np.nan)
    for t, row in enumerate(matrix):
        grid[t, : len(row)] = row
    size = min(12.0, max(4.5, 0.45 * n_tasks + 2.5))
    figure = _new_figure(size + 1.0, size)
    axis = figure.add_subplot()
    image = axis.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=100,
                        origin="upper", aspect="equal")
    figure.colorbar(image, ax=axis, label="accuracy (%)", fraction=0.046, pad=0.04)
    if n_tasks <= MAX_ANNOTATED_TASKS:
        font = 9 if n_tasks <= 10 else 6
        for t in range(n_tasks):
            for j in range(t + 1):
                value = grid[t, j]
                # Dark text on the bright end of viridis, white elsewhere.
                colour = "black" if value >= 60 else "white"
                axis.text(j, t, f"{value:.1f}", ha="center", va="center", fontsize=font,
                          color=colour)
    _task_ticks(axis, n_tasks, "x")
    _task_ticks(axis, n_tasks, "y")
    axis.set_xlabel("evaluated on task j")
    axis.set_ylabel("after training task t")
    axis.set_title(title)
    return _save(figure, path)


def plot_average_accuracy(curves: Mapping[str, Sequence[float]], path: str | Path,
                          title: str = "Average accuracy over seen classes") -> Path:
    """One line per run: accuracy over all seen classes after each task (the AAA curve)."""
    figure = _new_figure(7.0, 4.5)
    axis = figure.add_subplot()
    longest = 1
    for label, curve in curves.items():
        curve = [float(v) for v in curve]
        longest = max(longest, len(curve))
        aaa = float(np.mean(curve)) if curve else float("nan")
        axis.plot(range(len(curve)), curve, marker="o", markersize=4,
                  label=f"{label} (AAA {aaa:.2f})")
    axis.set_xlabel("after training task t")
    axis.set_ylabel("accuracy on all seen classes (%)")
    axis.set_ylim(0, 100)
    axis.set_xlim(-0.5, longest - 0.5)
    _task_ticks(axis, longest, "x")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="lower left", fontsize=8)
    axis.set_title(title)
    return _save(figure, path)


def plot_forgetting(forgetting_per_task: Sequence[float], path: str | Path,
                    title: str = "Forgetting per task") -> Path:
    """Bars: max earlier accuracy minus final accuracy for each old task j < T-1."""
    values = [float(v) for v in forgetting_per_task]
    figure = _new_figure(max(6.0, min(14.0, 0.25 * len(values) + 4)), 4.0)
    axis = figure.add_subplot()
    if values:
        axis.bar(range(len(values)), values, color="tab:red", alpha=0.8)
        mean = float(np.mean(values))
        axis.axhline(mean, color="black", linestyle="--", linewidth=1,
                     label=f"mean {mean:.2f}")
        axis.legend(loc="upper right", fontsize=8)
        _task_ticks(axis, len(values), "x")
    else:
        axis.text(0.5, 0.5, "single task: nothing to forget", ha="center", va="center",
                  transform=axis.transAxes)
    axis.set_xlabel("task j")
    axis.set_ylabel("forgetting (percentage points)")
    axis.grid(True, axis="y", alpha=0.3)
    axis.set_title(title)
    return _save(figure, path)


def plot_rank_heatmap(ranks: Mapping[str, Mapping[str, int]], path: str | Path,
                      title: str = "LoRA rank per layer and task") -> Path:
    """Layer x task heatmap of the ranks chosen per task (`ranks[task_id][layer]`).

    Task ids may be strings (as stored in JSON); layers are sorted naturally. A layer without
    a rank for some task is left blank.
    """
    task_ids = sorted(ranks, key=lambda t: int(t))
    layers = sorted({layer for per_task in ranks.values() for layer in per_task}, key=natural_key)
    grid = np.full((len(layers), len(task_ids)), np.nan)
    for column, task in enumerate(task_ids):
        for row, layer in enumerate(layers):
            if layer in ranks[task]:
                grid[row, column] = float(ranks[task][layer])
    width = min(16.0, max(5.0, 0.4 * len(task_ids) + 4.0))
    height = min(20.0, max(3.5, 0.28 * len(layers) + 1.8))
    figure = _new_figure(width, height)
    axis = figure.add_subplot()
    image = axis.imshow(np.ma.masked_invalid(grid), cmap="magma", aspect="auto",
                        interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axis, label="rank")
    colorbar.locator = MaxNLocator(integer=True)  # ranks are whole numbers
    colorbar.update_ticks()
    if grid.size <= MAX_ANNOTATED_CELLS:
        top = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
        for row in range(len(layers)):
            for column in range(len(task_ids)):
                value = grid[row, column]
                if np.isfinite(value):
                    colour = "black" if value > 0.6 * top else "white"
                    axis.text(column, row, f"{value:.0f}", ha="center", va="center",
                              fontsize=7, color=colour)
    step = max(1, math.ceil(len(task_ids) / 20))
    axis.set_xticks(range(0, len(task_ids), step))
    axis.set_xticklabels([str(task_ids[i]) for i in range(0, len(task_ids), step)])
    axis.set_yticks(range(len(layers)))
    axis.set_yticklabels(layers, fontsize=7 if len(layers) > 24 else 8)
    axis.set_xlabel("task")
    axis.set_title(title)
    return _save(figure, path)


def plot_params_per_task(params_per_task: Sequence[int], path: str | Path,
                         title: str = "Trainable parameters added per task") -> Path:
    """Bars of parameters added by each task, with the cumulative total on a second axis."""
    values = np.asarray([float(v) for v in params_per_task])
    figure = _new_figure(max(6.0, min(14.0, 0.25 * len(values) + 4)), 4.0)
    axis = figure.add_subplot()
    tasks = np.arange(len(values))
    axis.bar(tasks, values, color="tab:blue", alpha=0.7, label="added")
    axis.set_xlabel("task")
    axis.set_ylabel("parameters added")
    cumulative_axis = axis.twinx()
    cumulative_axis.plot(tasks, np.cumsum(values), color="tab:orange", marker="o",
                         markersize=4, label="cumulative")
    cumulative_axis.set_ylabel("cumulative parameters")
    cumulative_axis.set_ylim(bottom=0)
    handles = axis.get_legend_handles_labels()
    more = cumulative_axis.get_legend_handles_labels()
    axis.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
    _task_ticks(axis, len(values), "x")
    axis.grid(True, axis="y", alpha=0.3)
    axis.set_title(title)
    return _save(figure, path)


def plot_eval_time(seconds_per_image: Sequence[float], path: str | Path,
                   tasks_seen: Sequence[int] | None = None,
                   title: str = "Evaluation cost per test image") -> Path:
    """Evaluation cost per test image against the number of tasks seen.

    `tasks_seen[k]` is how many tasks the k-th evaluation covered. Without it the points are
    drawn at evaluation steps 1, 2, ... (equal to tasks seen when every task had its own
    evaluation). The cost grows with T for methods that run every task's sub-network.
    """
    values = [1000.0 * float(v) for v in seconds_per_image]
    if tasks_seen is not None and len(tasks_seen) == len(values):
        xs, xlabel = [int(x) for x in tasks_seen], "tasks seen"
    else:
        xs, xlabel = list(range(1, len(values) + 1)), "evaluation step"
    figure = _new_figure(7.0, 4.0)
    axis = figure.add_subplot()
    axis.plot(xs, values, marker="o", markersize=4, color="tab:green")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("ms per test image")
    axis.set_ylim(bottom=0)
    _integer_ticks(axis, xs)
    axis.grid(True, alpha=0.3)
    axis.set_title(title)
    return _save(figure, path)


def plot_band_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float],
                                                Sequence[float] | None]],
                     path: str | Path, xlabel: str, ylabel: str, title: str,
                     ylim: tuple[float, float] | None = None) -> Path:
    """Overlaid curves `{label: (xs, mean, std)}`, each with a shaded mean ± std band.

    `std` is None (or all zeros) for a single run: the line is drawn without a band.
    """
    figure = _new_figure(7.5, 4.5)
    axis = figure.add_subplot()
    all_xs: list[float] = []
    for label, (xs, mean, std) in curves.items():
        xs = np.asarray([float(x) for x in xs])
        mean = np.asarray([float(v) for v in mean])
        all_xs.extend(xs.tolist())
        (line,) = axis.plot(xs, mean, marker="o", markersize=3, label=label)
        if std is not None:
            std = np.asarray([float(v) for v in std])
            if np.any(std > 0):
                axis.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if ylim is not None:
        axis.set_ylim(*ylim)
    else:
        axis.set_ylim(bottom=0)
    if all_xs:
        _integer_ticks(axis, all_xs)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    axis.set_title(title)
    return _save(figure, path)


def _integer_ticks(axis, xs: Sequence[float]) -> None:
    """Integer x ticks over the range of `xs`, thinned to about 20."""
    low, high = int(math.floor(min(xs))), int(math.ceil(max(xs)))
    step = max(1, math.ceil((high - low + 1) / 20))
    axis.set_xticks(list(range(low, high + 1, step)))
