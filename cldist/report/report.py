"""Reports with plots, built from finished run directories: markdown + self-contained HTML.

`write_report(RUN)` reads `RUN/metrics.json` (plus `state.json` and `config.json` when there)
and writes `RUN/report.md`, `RUN/report.html`, `RUN/plots/*.png`, and the same figures as
images in TensorBoard under `RUN/tb/report/`.

`write_comparison([RUN_A, RUN_B, ...], OUT.md)` writes `OUT.md` and `OUT.html`: one table with
mean ± standard deviation over the seeds of each configuration, overlaid curves, and a
per-run table. Runs whose configs are identical except for the seed (and the keys that only
say where or how the run executed, see NOT_CONFIGURATION) are seeds of one configuration.

metrics.json keys used: acc, aaa, forgetting, bwt, accuracy_matrix, n_tasks, method,
params_per_task (int, or one int per task), wall_seconds; optional: params_added (one int per
task; preferred over params_per_task for the per-task figure), ranks ({task_id: {layer:
rank}}), eval_seconds_per_image (one per evaluation step) with eval_tasks_seen (tasks each
evaluation covered), avg_acc_curve and forgetting_per_task (recomputed from the matrix when
absent; the curve uses `n_test`, the per-task test sizes, when present),
scenario/backbone/seed/runner/kernels for the header, and for sub-network methods
accuracy_matrix_routed / accuracy_matrix_ensemble, class_il_rule, forwards_per_image,
task_id_acc and routing (both Class-IL rules side by side).
state.json is read for SD-LoRA's per-task rank (`task_meta[t].rank`) when `ranks` holds no
per-layer ranks.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cldist.errors import UserError
from cldist.eval.metrics import summarize
from cldist.report import plots
from cldist.report.document import (
    Document,
    Section,
    Table,
    render_html,
    render_markdown,
)
from cldist.atomic_io import write_text_atomic
from cldist.rundir import RunDir
from cldist.report.summary import (
    flatten_config,
    SUMMARY_COLUMNS,
    format_count,
    format_duration,
    summary_row,
)

HEADER_KEYS = ("scenario", "backbone", "seed", "runner", "kernels")
# A markdown grid of the matrix is readable up to about this many tasks; the heatmap always is.
MAX_MARKDOWN_MATRIX_TASKS = 12
# Row label of the rank heatmap for methods with one rank per task for every layer (SD-LoRA).
EVERY_LAYER = "every layer"
# Config keys that do not change what a run learns: where it ran and how it was scheduled
# (the keys `cldist resume` lets change), where the data lies, and the seed itself. Runs equal
# in every other key are seeds of one configuration. A prefix covers its whole sub-tree.
NOT_CONFIGURATION = ("seed", "run_dir", "report", "runner", "cluster",
                     "trainer.max_concurrent_tasks", "trainer.max_failures", "trainer.poll_interval_s",
                     "trainer.gpus_per_worker",
                     "scenario.data_dir", "scenario.root")
# Keys shown to tell apart configurations of the same method, at most this many per label.
MAX_LABEL_KEYS = 3
# The comparison's table of differing config keys stops here; config.yaml has the rest.
MAX_CONFIG_ROWS = 40
TENSORBOARD_SUBDIR = "report"


# --------------------------------------------------------------------------- reading a run

def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """`RUN/metrics.json`, checked (RunDir.read_metrics): a missing file or key is a UserError
    naming it."""
    return RunDir(run_dir).read_metrics()


# --------------------------------------------------------------------------- derived series

def derived_curves(metrics: Mapping[str, Any]) -> tuple[list[float], list[float]]:
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


def params_added(metrics: Mapping[str, Any]) -> list[int]:
    """Trainable parameters added by each task.

    `params_added` holds the per-task values; `params_per_task` is their mean in metrics.json
    written by `cldist run` (an int), or the per-task list in older/hand-made files.
    """
    n_tasks = len(metrics["accuracy_matrix"])
    if metrics.get("params_added"):
        return [int(p) for p in metrics["params_added"]]
    return params_list(metrics["params_per_task"], n_tasks)


def mean_params_per_task(metrics: Mapping[str, Any]) -> float:
    values = params_added(metrics)
    return sum(values) / len(values) if values else float("nan")


def rank_grid(metrics: Mapping[str, Any],
              state: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], str]:
    """(`{task_id: {layer: rank}}`, caption) for the rank heatmap; ({}, "") when no ranks.

    Per-layer ranks (PEARL, CoDyRA, InfLoRA) are metrics.json's / state.json's `ranks`; a task
    without any (PEARL's trained reference) stays a blank column. SD-LoRA's variants keep one
    rank per task for every layer in `state.json`'s `task_meta[t].rank`; SD-LoRA-KD's absorbed
    tasks (the new direction was folded into old ones) add rank 0. A constant rank on every
    task and layer (plain SD-LoRA) is no allocation, so it gets no figure.
    """
    per_layer = metrics.get("ranks") or state.get("ranks") or {}
    if any(per_layer.values()):
        grid = {str(t): {str(layer): int(r) for layer, r in ranks.items()}
                for t, ranks in per_layer.items()}
        return grid, ("LoRA rank of each task's adapter (columns) in each adapted layer (rows); "
                      "blank: no rank recorded for that task and layer (e.g. PEARL's trained "
                      "reference task).")
    task_meta = state.get("task_meta") or {}
    per_task = {}
    for t, meta in task_meta.items():
        if isinstance(meta, Mapping) and isinstance(meta.get("rank"), (int, float)):
            absorbed = bool((meta.get("kd") or {}).get("absorbed"))
            per_task[str(t)] = 0 if absorbed else int(meta["rank"])
    if len(set(per_task.values())) > 1:
        return ({t: {EVERY_LAYER: r} for t, r in per_task.items()},
                "Rank of each task's LoRA adapter, the same for every adapted layer "
                "(0: the task's direction was absorbed into earlier ones).")
    return {}, ""


def eval_cost(metrics: Mapping[str, Any]) -> tuple[list[float], list[int] | None]:
    """(seconds per test image per evaluation step, tasks each step covered or None).

    Methods scored task by task evaluate once per task, so without `eval_tasks_seen` a list of
    n_tasks entries is taken as tasks 1..n. Tasks finishing together (PEARL on a cluster) share
    an evaluation, so the list can be shorter; then the steps cannot be placed by task count.
    """
    seconds = [float(s) for s in metrics.get("eval_seconds_per_image") or []]
    tasks_seen = metrics.get("eval_tasks_seen")
    if tasks_seen is not None and len(tasks_seen) == len(seconds):
        return seconds, [int(t) for t in tasks_seen]
    if len(seconds) == len(metrics["accuracy_matrix"]):
        return seconds, list(range(1, len(seconds) + 1))
    return seconds, None


# --------------------------------------------------------------------------- one run

def html_path(markdown_path: str | Path) -> Path:
    """The HTML twin of a markdown report (`report.md` -> `report.html`)."""
    return Path(markdown_path).with_suffix(".html")


def write_report(run_dir: str | Path, tensorboard: bool = True) -> Path:
    """Write `RUN/report.md`, `RUN/report.html` and `RUN/plots/*.png`; return report.md's path.

    With `tensorboard`, the figures (and parameter / evaluation-cost scalars) also go to
    `RUN/tb/report/`, a TensorBoard run of its own next to the training curves in `RUN/tb/`;
    writing the report again replaces them.
    """
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    metrics = run.read_metrics()
    state = run.read_state()
    document = build_run_document(run_dir, metrics, state)
    markdown = write_text_atomic(run_dir / "report.md", render_markdown(document, run_dir))
    write_text_atomic(html_path(markdown), render_html(document))
    if tensorboard:
        seconds, tasks_seen = eval_cost(metrics)
        write_report_tensorboard(run_dir / "tb" / TENSORBOARD_SUBDIR,
                                 [s.figure for s in document.sections if s.figure is not None],
                                 params_added(metrics), seconds, tasks_seen,
                                 step=len(metrics["accuracy_matrix"]) - 1)
    return markdown


def build_run_document(run_dir: Path, metrics: Mapping[str, Any],
                       state: Mapping[str, Any]) -> Document:
    """Draw the run's figures into `run_dir/plots/` and lay out its report."""
    plot_dir = run_dir / "plots"
    matrix = metrics["accuracy_matrix"]
    n_tasks = len(matrix)
    curve, forgetting = derived_curves(metrics)
    method = str(metrics["method"])
    sections = [Section("Summary", "Acc: accuracy on all classes after the last task. AAA: "
                        "mean over tasks of the accuracy on all classes seen so far. "
                        "forgetting / BWT: mean drop / change of old tasks' accuracy "
                        "(percentage points).",
                        table=Table(list(SUMMARY_COLUMNS), [summary_row(metrics)]))]

    matrix_section = Section(
        "Accuracy matrix", "R[t][j] = accuracy (%) on task j's test data after training task t"
        + (f" ({metrics['class_il_rule']} Class-IL rule)." if "class_il_rule" in metrics else "."),
        figure=plots.plot_accuracy_matrix(matrix, plot_dir / "accuracy_matrix.png",
                                          title=f"{method}: accuracy matrix R[t][j] (%)"))
    if n_tasks <= MAX_MARKDOWN_MATRIX_TASKS:
        matrix_section.extra_tables.append(_matrix_table(matrix))
    sections.append(matrix_section)

    rules_section = class_il_rules_section(metrics, plot_dir)
    if rules_section is not None:
        sections.append(rules_section)

    task_il = metrics.get("task_il_accuracy_matrix")
    if task_il:  # runs written before Task-IL scoring have none
        til_section = Section(
            "Task-IL accuracy",
            f"The same predictions with the task id given (argmax over the true task's classes "
            f"only): {float(metrics['task_il_acc']):.1f} % after the last task, forgetting "
            f"{float(metrics['task_il_forgetting']):.1f} points. The gap to Class-IL Acc is "
            f"confusion between tasks; Task-IL forgetting is what the method lost of each task.")
        if len(task_il) <= MAX_MARKDOWN_MATRIX_TASKS:
            til_section.extra_tables.append(_matrix_table(task_il))
        sections.append(til_section)

    sections.append(Section(
        "Average accuracy",
        "Accuracy on all classes seen so far, after each task; AAA is the mean of this curve.",
        figure=plots.plot_average_accuracy({method: curve}, plot_dir / "avg_accuracy.png")))

    sections.append(Section(
        "Forgetting",
        "forgetting_j = max over t < T-1 of R[t][j] - R[T-1][j], for every old task j.",
        figure=plots.plot_forgetting(forgetting, plot_dir / "forgetting.png")))

    ranks, rank_caption = rank_grid(metrics, state)
    if ranks:
        sections.append(Section(
            "Ranks", rank_caption,
            figure=plots.plot_rank_heatmap(ranks, plot_dir / "ranks.png",
                                           title=f"{method}: LoRA rank per layer and task")))

    params = params_added(metrics)
    sections.append(Section(
        "Parameters",
        f"Trainable parameters added by each task (bars) and in total (line): "
        f"{format_count(sum(params))} over {len(params)} tasks.",
        figure=plots.plot_params_per_task(params, plot_dir / "params.png")))

    seconds, tasks_seen = eval_cost(metrics)
    if seconds:
        where = ("against the number of tasks evaluated" if tasks_seen is not None else
                 "per evaluation step (tasks that finished together were evaluated together)")
        sections.append(Section(
            "Evaluation cost",
            f"Wall time of evaluation per test image, {where}. Methods that run every task's "
            f"sub-network on each image grow with the number of tasks.",
            figure=plots.plot_eval_time(seconds, plot_dir / "eval_time.png", tasks_seen)))

    details = [(key, "; ".join(map(str, metrics[key])) if isinstance(metrics[key], list)
                else str(metrics[key])) for key in HEADER_KEYS if key in metrics]
    return Document(f"cldist report: {method}, {metrics['n_tasks']} tasks", details, sections)


RULE_COLUMNS = ["Class-IL rule", "Acc", "AAA", "forgetting", "BWT", "forwards/image"]


def class_il_rules_section(metrics: Mapping[str, Any], plot_dir: Path) -> Section | None:
    """A sub-network method's two Class-IL rules side by side: one table row each, and the
    matrix of the rule the summary does not report (None for runs without both rules)."""
    matrices = {rule: metrics.get(f"accuracy_matrix_{rule}") for rule in ("routed", "ensemble")}
    matrices = {rule: m for rule, m in matrices.items() if m}
    if not matrices:
        return None
    n_test = metrics.get("n_test")
    forwards = metrics.get("forwards_per_image") or {}
    reported = metrics.get("class_il_rule", "ensemble")
    rows = []
    for rule, matrix in matrices.items():
        s = summarize(matrix, n_test)
        rows.append([rule + (" (reported)" if rule == reported else ""),
                     *(f"{s[k]:.2f}" for k in ("acc", "aaa", "forgetting", "bwt")),
                     str(forwards.get(rule, "-"))])
    caption = ("Sub-network methods decide Class-IL two ways, both scored on the same "
               "sub-networks: ensemble (the paper's protocol: every sub-network on every image, "
               "argmax over the concatenated logits) and routed (one reference-network forward, "
               "the class statistics' task posterior picks the top-k sub-networks, combined "
               "with their log-softmax). The summary reports "
               f"`eval.class_il={reported}`.")
    task_id = metrics.get("task_id_acc")
    if task_id:
        routing = metrics.get("routing") or {}
        caption += (f" The router found the image's task first for {task_id['top1']:.1f} % of "
                    f"the final test images, among its top {task_id['k']} for "
                    f"{task_id['top_k']:.1f} %"
                    + (f" (combine: {routing['combine']}, shrinkage {routing['shrinkage']})"
                       if routing else "") + ".")
    section = Section("Class-IL decision: routed and ensemble", caption,
                      table=Table(RULE_COLUMNS, rows))
    other = next((rule for rule in matrices if rule != reported), None)
    if other is not None:
        matrix = matrices[other]
        section.figure = plots.plot_accuracy_matrix(
            matrix, plot_dir / f"accuracy_matrix_{other}.png",
            title=f"{metrics['method']}: accuracy matrix, {other} rule (%)")
        if len(matrix) <= MAX_MARKDOWN_MATRIX_TASKS:
            section.extra_tables.append(_matrix_table(matrix))
    return section


def write_report_tensorboard(tb_dir: Path, figures: Sequence[Path], params: Sequence[int],
                             eval_seconds: Sequence[float], eval_tasks_seen: Sequence[int] | None,
                             step: int) -> None:
    """The report's figures as TensorBoard images, plus parameter and evaluation-cost scalars.

    Tags: `report/{figure stem}` (step = last task id), `params/added`, `params/cumulative`
    (step = task id), `eval/ms_per_image` (step = last task id the evaluation covered).
    """
    from cldist.report.tensorboard import TensorBoardLogger  # torch: only when used

    # Replace, not append: a second `cldist report` would otherwise show every image twice.
    for old in Path(tb_dir).glob("events.out.tfevents.*"):
        old.unlink()
    with TensorBoardLogger(tb_dir) as logger:
        for png in figures:
            logger.log_figure(f"report/{Path(png).stem}", png, step)
        total = 0
        for task_id, added in enumerate(params):
            total += int(added)
            logger.log_scalar("params/added", added, task_id)
            logger.log_scalar("params/cumulative", total, task_id)
        for k, seconds in enumerate(eval_seconds):
            covered = eval_tasks_seen[k] if eval_tasks_seen is not None else k + 1
            logger.log_scalar("eval/ms_per_image", 1000.0 * seconds, covered - 1)


def _matrix_table(matrix: Sequence[Sequence[float]]) -> Table:
    n_tasks = len(matrix)
    headers = ["after task"] + [f"task {j}" for j in range(n_tasks)]
    rows = [[str(t)] + [f"{float(v):.1f}" for v in row] + [""] * (n_tasks - len(row))
            for t, row in enumerate(matrix)]
    return Table(headers, rows)


# --------------------------------------------------------------------------- comparison

COMPARISON_COLUMNS = ["configuration", "seeds", "n_tasks", "Acc", "AAA", "forgetting", "BWT",
                      "params/task", "wall time"]
RUN_COLUMNS = ["run", "configuration", "seed", "Acc", "AAA", "forgetting", "BWT",
               "params/task", "wall time"]


@dataclass
class ComparedRun:
    run_dir: Path
    name: str                       # unique short name (the directory's)
    metrics: dict[str, Any]
    configuration: dict[str, Any]   # flat config without NOT_CONFIGURATION keys
    seed: Any


@dataclass
class ConfigGroup:
    label: str
    runs: list[ComparedRun]


def configuration_of(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What a run learned under: its flat config minus NOT_CONFIGURATION keys.

    Without a config file, the run's method, scenario, backbone and task count stand in.
    """
    if not config:
        return {key: metrics.get(key) for key in ("method", "scenario", "backbone", "n_tasks")}
    return {key: value for key, value in flatten_config(config).items()
            if not any(key == skip or key.startswith(skip + ".") for skip in NOT_CONFIGURATION)}


def group_by_configuration(runs: Sequence[ComparedRun]) -> list[ConfigGroup]:
    """Runs with identical configurations, in order of first appearance, with readable labels.

    A label is the method name; methods compared in several configurations get the keys that
    tell those configurations apart (`sdlora (method.lr=0.0005)`).
    """
    groups: dict[str, list[ComparedRun]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.configuration, sort_keys=True, default=str), []).append(run)
    members = list(groups.values())
    methods = [str(g[0].metrics["method"]) for g in members]
    labels = []
    for method, group in zip(methods, members):
        same_method = [g[0].configuration for m, g in zip(methods, members) if m == method]
        keys = differing_keys(same_method) if len(same_method) > 1 else []
        shown = ", ".join(f"{k}={group[0].configuration.get(k)}" for k in keys[:MAX_LABEL_KEYS])
        more = f", +{len(keys) - MAX_LABEL_KEYS} keys" if len(keys) > MAX_LABEL_KEYS else ""
        labels.append(f"{method} ({shown}{more})" if keys else method)
    return [ConfigGroup(label, group) for label, group in zip(labels, members)]


def differing_keys(configurations: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose values are not the same in every configuration (missing counts as a value)."""
    keys = sorted({key for c in configurations for key in c})
    return [key for key in keys
            if len({json.dumps(c.get(key), default=str) for c in configurations}) > 1]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def format_mean_std(values: Sequence[float], fmt=lambda v: f"{v:.2f}") -> str:
    """`73.00 ± 1.20` over several values, `73.00` for one, `-` when any value is missing."""
    if not values or any(v is None or not math.isfinite(float(v)) for v in values):
        return "-"
    mean, std = mean_std(values)
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _group_row(group: ConfigGroup) -> list[str]:
    metrics = [run.metrics for run in group.runs]
    n_tasks = sorted({len(m["accuracy_matrix"]) for m in metrics})
    return [
        group.label,
        str(len(group.runs)),
        "/".join(str(n) for n in n_tasks),
        *(format_mean_std([m[key] for m in metrics])
          for key in ("acc", "aaa", "forgetting", "bwt")),
        format_mean_std([mean_params_per_task(m) for m in metrics], format_count),
        format_mean_std([m["wall_seconds"] for m in metrics], format_duration),
    ]


def _run_row(run: ComparedRun, group_label: str) -> list[str]:
    row = summary_row(run.metrics)
    by_column = dict(zip(SUMMARY_COLUMNS, row))
    by_column["params/task"] = format_count(mean_params_per_task(run.metrics))
    return [run.name, group_label, str(run.seed)] + [by_column[c] for c in RUN_COLUMNS[3:]]


def _mean_curve(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float] | None]:
    """Point-wise mean and std of equally long curves (cut to the shortest otherwise)."""
    length = min(len(c) for c in curves)
    stats = [mean_std([c[i] for c in curves]) for i in range(length)]
    means = [m for m, _ in stats]
    stds = None if len(curves) < 2 else [s for _, s in stats]
    return means, stds


def write_comparison(run_dirs: Sequence[str | Path], out_path: str | Path,
                     extra_sections: Sequence[Section] = ()) -> Path:
    """Compare runs: `OUT.md` and `OUT.html`, figures under `plots/{OUT stem}_*.png` beside them.

    `extra_sections` follow the summary table (a sweep's paired differences,
    cldist.report.paired). Returns the markdown path; the HTML is `html_path(...)` of it.
    """
    if not run_dirs:
        raise UserError("write_comparison needs at least one run directory")
    out_path = Path(out_path)
    plot_dir = out_path.parent / "plots"
    names = _unique_names([Path(d) for d in run_dirs])
    runs = []
    for name, run_dir in zip(names, run_dirs):
        run = RunDir(run_dir)
        metrics = run.read_metrics()
        config = run.read_config(checked=False)
        seed = config.get("seed", metrics.get("seed", "-"))
        runs.append(ComparedRun(Path(run_dir), name, metrics, configuration_of(config, metrics),
                                seed))
    groups = group_by_configuration(runs)
    several_seeds = any(len(g.runs) > 1 for g in groups)

    summary_caption = ("One row per configuration. Acc: final accuracy on all classes; AAA: "
                       "average anytime accuracy; forgetting and BWT in percentage points; "
                       "params/task: trainable parameters added per task.")
    if several_seeds:
        summary_caption += (" Runs with the same config except the seed are one configuration:"
                            " mean ± sample standard deviation over its seeds.")
    repeated = [f"{g.label}: seed {seed}" for g in groups
                for seed, count in Counter(str(r.seed) for r in g.runs).items() if count > 1]
    if repeated:
        summary_caption += f" Note, a seed appears twice in: {'; '.join(repeated)}."
    headers, rows = list(COMPARISON_COLUMNS), [_group_row(g) for g in groups]
    if any("acc_ensemble" in run.metrics for run in runs):
        # sub-network methods: both Class-IL rules side by side ("-": a run without that rule)
        headers += ["Acc routed", "Acc ensemble"]
        for row, group in zip(rows, groups):
            row += [format_mean_std([r.metrics.get(key) for r in group.runs])
                    for key in ("acc_routed", "acc_ensemble")]
        summary_caption += (" Acc routed / Acc ensemble: a sub-network method's two Class-IL "
                            "rules (Acc is the one its eval.class_il names).")
    sections = [Section("Summary", summary_caption, table=Table(headers, rows)),
                *extra_sections]

    band = "; shaded: ± one standard deviation over seeds" if several_seeds else ""
    accuracy = {}
    cumulative_params = {}
    for group in groups:
        mean, std = _mean_curve([derived_curves(r.metrics)[0] for r in group.runs])
        accuracy[_legend(group)] = (range(len(mean)), mean, std)
        totals = [_cumulative(params_added(r.metrics)) for r in group.runs]
        mean, std = _mean_curve(totals)
        cumulative_params[_legend(group)] = (range(len(mean)), mean, std)
    sections.append(Section(
        "Average accuracy", f"Accuracy on all classes seen so far after each task{band}.",
        figure=plots.plot_band_curves(accuracy, plot_dir / f"{out_path.stem}_avg_accuracy.png",
                                      "after training task t", "accuracy on seen classes (%)",
                                      "Average accuracy over seen classes", ylim=(0, 100))))
    sections.append(Section(
        "Parameters", f"Trainable parameters added in total after each task{band}.",
        figure=plots.plot_band_curves(cumulative_params,
                                      plot_dir / f"{out_path.stem}_params.png",
                                      "after training task t", "cumulative parameters added",
                                      "Cumulative trainable parameters")))

    eval_curves = {}
    for group in groups:
        costs = [eval_cost(r.metrics) for r in group.runs]
        if all(seconds and tasks_seen for seconds, tasks_seen in costs):
            mean, std = _mean_curve([[1000.0 * s for s in seconds] for seconds, _ in costs])
            eval_curves[_legend(group)] = (costs[0][1][: len(mean)], mean, std)
    if eval_curves:
        sections.append(Section(
            "Evaluation cost", f"Evaluation wall time per test image against the number of "
                               f"tasks evaluated{band}.",
            figure=plots.plot_band_curves(eval_curves, plot_dir / f"{out_path.stem}_eval_time.png",
                                          "tasks seen", "ms per test image",
                                          "Evaluation cost per test image")))

    if len(groups) > 1:
        keys = differing_keys([g.runs[0].configuration for g in groups])
        if keys:
            caption = "Config keys that differ between the configurations compared"
            if len(keys) > MAX_CONFIG_ROWS:
                caption += f" (first {MAX_CONFIG_ROWS} of {len(keys)}; see each config.yaml)"
            sections.append(Section(
                "Configurations", caption + ".",
                table=Table(["key"] + [g.label for g in groups],
                            [[key] + [str(g.runs[0].configuration.get(key, "-")) for g in groups]
                             for key in keys[:MAX_CONFIG_ROWS]])))

    run_rows = [_run_row(run, group.label) for group in groups for run in group.runs]
    sources = "; ".join(f"{run.name}: {run.run_dir}" for group in groups for run in group.runs)
    sections.append(Section("Runs", f"Every run on its own. Directories: {sources}.",
                            table=Table(list(RUN_COLUMNS), run_rows)))

    title = f"cldist comparison: {len(runs)} runs, {len(groups)} configurations"
    document = Document(title, [], sections)
    markdown = write_text_atomic(out_path, render_markdown(document, out_path.parent))
    write_text_atomic(html_path(markdown), render_html(document))
    return markdown


def _legend(group: ConfigGroup) -> str:
    return f"{group.label}, n={len(group.runs)}" if len(group.runs) > 1 else group.label


def _cumulative(values: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += float(value)
        out.append(total)
    return out


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    # Directory names, made unique with their parent when two runs share a name.
    names = [d.resolve().name for d in run_dirs]
    return [f"{d.resolve().parent.name}/{name}" if names.count(name) > 1 else name
            for d, name in zip(run_dirs, names)]
