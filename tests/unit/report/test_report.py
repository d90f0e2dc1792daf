"""Reporting: summary tables, atomic JSON, TensorBoard tags, report.md/.html + plots, comparisons.

Run directories are fabricated by hand (metrics.json, state.json, config.json as `cldist run`
writes them), so these tests need no training. Progress view tests: tests/unit/report/test_progress.py.
"""
import base64
import io
import json
import re

import pytest

from cldist.errors import UserError
from cldist.report.summary import (
    format_comparison_table,
    format_duration,
    format_summary_table,
    write_json_atomic,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MATRIX = [[80.0], [85.0, 70.0], [60.0, 65.0, 90.0], [58.0, 62.0, 84.0, 88.0]]


def fake_metrics(method="pearl", **extra):
    metrics = {
        "method": method, "n_tasks": 4, "acc": 73.0, "aaa": 76.5, "forgetting": 10.33,
        "bwt": -9.67, "accuracy_matrix": MATRIX, "params_per_task": [12288, 9216, 15360, 6144],
        "wall_seconds": 125.0,
    }
    metrics.update(extra)
    return metrics


# --------------------------------------------------------------------------- summary

def test_summary_table_has_every_column_and_the_grid():
    text = format_summary_table(fake_metrics())
    for column in ("method", "n_tasks", "Acc", "AAA", "forgetting", "BWT", "params/task",
                   "wall time"):
        assert column in text
    assert "pearl" in text and "73.00" in text and "-9.67" in text and "2m05s" in text
    assert "accuracy matrix" in text
    assert "88.0" in text.splitlines()[-1]  # last grid row = after the last task


def test_comparison_table_one_row_per_run():
    text = format_comparison_table([fake_metrics("pearl"), fake_metrics("sdlora", acc=70.1)],
                                   labels=["run_a", "run_b"])
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, two runs
    assert "run_b" in lines[3] and "sdlora" in lines[3] and "70.10" in lines[3]


def test_missing_values_show_a_dash():
    text = format_summary_table({"method": "seq_ft"})
    assert "seq_ft" in text and " - " in text


def test_format_duration():
    assert format_duration(12.34) == "12.3s"
    assert format_duration(80) == "1m20s"
    assert format_duration(7500) == "2h05m"
    assert format_duration(None) == "-"


def test_write_json_atomic(tmp_path):
    import numpy as np

    path = tmp_path / "sub" / "state.json"
    write_json_atomic(path, {"a": 1, "x": np.float32(0.5), "v": np.arange(3)})
    write_json_atomic(path, {"a": 2, "x": 0.5, "v": [0, 1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "x": 0.5, "v": [0, 1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp file left


# --------------------------------------------------------------------------- TensorBoard

def test_tensorboard_scalar_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cldist.report.tensorboard import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log_epoch(3, "stage2", epoch=1, global_step=10, loss=0.53, lr=9.5e-4)
    logger.log_epoch(4, "stage2", epoch=0, global_step=11, loss=0.61, lr=None)  # lr unknown
    logger.log_task_row(1, [85.0, 70.0], acc=77.5, aaa=78.75)
    logger.log_ranks(1, {"blocks.0.attn.k": 4, "blocks.1.attn.k": 6})
    logger.log_hparams({"method": "pearl", "trainer": {"epochs": 2, "lr": 1e-3}, "x": [1]},
                       {"acc": 77.5, "aaa": 78.75, "accuracy_matrix": MATRIX[:2]})
    logger.close()
    logger.close()  # idempotent

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/task_003/stage2/loss", "train/task_003/stage2/lr", "eval/acc_task_0",
                "eval/acc_task_1", "eval/acc", "eval/aaa", "ranks/blocks.0.attn.k",
                "ranks/blocks.1.attn.k", "ranks/total", "hparam/acc", "hparam/aaa"}
    assert expected <= tags
    assert "train/task_004/stage2/loss" in tags and "train/task_004/stage2/lr" not in tags
    # the HParams tab: the experiment and session records of the hparams plugin
    hparams_records = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams_records)
    assert b"trainer.epochs" in hparams_records["_hparams_/session_start_info"]
    (loss,) = events.Scalars("train/task_003/stage2/loss")
    assert loss.step == 10 and loss.value == pytest.approx(0.53)
    (total,) = events.Scalars("ranks/total")
    assert total.step == 1 and total.value == 10
    (acc_task_1,) = events.Scalars("eval/acc_task_1")
    assert acc_task_1.step == 1 and acc_task_1.value == pytest.approx(70.0)


# --------------------------------------------------------------------------- fabricated runs

LAYERS = ("blocks.0.attn.qkv.k", "blocks.1.attn.qkv.k", "blocks.2.attn.qkv.k",
          "blocks.10.attn.qkv.k")
RUN_FIGURES = {"accuracy_matrix", "avg_accuracy", "forgetting", "params", "eval_time"}


def write_run(run, method="pearl", seed=0, matrix=MATRIX, ranks=None, task_meta=None,
              lr=1e-3, **extra):
    """A finished run directory as `cldist run` leaves it (the files the report reads)."""
    from cldist.eval.metrics import summarize

    run.mkdir(parents=True)
    n_tasks = len(matrix)
    s = summarize(matrix)
    params = [12288, 9216, 15360, 6144][:n_tasks]
    metrics = {
        "method": method, "n_tasks": n_tasks, "acc": s["acc"], "aaa": s["aaa"],
        "forgetting": s["forgetting"], "bwt": s["bwt"], "accuracy_matrix": matrix,
        "avg_acc_curve": s["avg_acc_curve"], "forgetting_per_task": s["forgetting_per_task"],
        "params_per_task": round(sum(params) / n_tasks), "params_added": params,
        "wall_seconds": 125.0 + seed, "ranks": ranks or {str(t): {} for t in range(n_tasks)},
        "eval_seconds_per_image": [0.002 * (t + 1) for t in range(n_tasks)],
        "scenario": "digits_4t", "backbone": "test_vit", "seed": seed, "runner": "inline",
    }
    metrics.update(extra)
    state = {"completed_tasks": list(range(n_tasks)), "ranks": metrics["ranks"],
             "params_per_task": {str(t): p for t, p in enumerate(params)},
             "accuracy_matrix": matrix, "status": "finished",
             "task_meta": task_meta or {str(t): {"task_id": t} for t in range(n_tasks)}}
    config = {"method": {"name": method, "lr": lr, "epochs": 2}, "seed": seed,
              "run_dir": str(run), "runner": "inline", "report": True,
              "cluster": {"address": ""}, "trainer": {"batch_size": 32, "max_failures": 1},
              "scenario": {"name": "digits_4t", "data_dir": f"/data/{seed}"}}
    for name, content in (("metrics.json", metrics), ("state.json", state),
                          ("config.json", config)):
        (run / name).write_text(json.dumps(content))
    return run


def pearl_ranks():
    # task 0 is PEARL's trained reference: no ranks of its own (a blank heatmap column)
    return {"0": {}, **{str(t): {layer: 2 + b + t for b, layer in enumerate(LAYERS)}
                        for t in range(1, 4)}}


def check_png(data: bytes, name: str) -> None:
    """A real figure: a PNG that decodes, of a decent size, and not one flat colour."""
    from PIL import Image

    assert data.startswith(PNG_SIGNATURE), name
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.width >= 300 and image.height >= 200, (name, image.size)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 20, name


def markdown_figures(markdown_path):
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown_path.read_text())


def check_html_embeds(html_path, n_figures: int) -> str:
    """Self-contained: every image is a PNG data URI that decodes; no external resource."""
    text = html_path.read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == n_figures
    for k, source in enumerate(sources):
        assert source.startswith("data:image/png;base64,")
        check_png(base64.b64decode(source.split(",", 1)[1], validate=True), f"html image {k}")
    assert "<link" not in text and "<script" not in text and "url(" not in text
    assert "<style>" in text
    return text


def scalar_and_image_tags(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events, set(events.Tags()["scalars"]), set(events.Tags()["images"])


# --------------------------------------------------------------------------- one run's report

def test_pearl_report_md_html_and_tensorboard(tmp_path):
    from cldist.report.report import write_report, write_report_tensorboard

    run = write_run(tmp_path / "pearl", ranks=pearl_ranks())
    report = write_report(run)
    assert report == run / "report.md"

    referenced = markdown_figures(report)
    assert set(referenced) == {f"plots/{name}.png" for name in RUN_FIGURES | {"ranks"}}
    for relative in referenced:
        check_png((run / relative).read_bytes(), relative)
    text = report.read_text()
    assert "| pearl | 4 | 73.00 | 75.54 |" in text  # the summary table
    assert "digits_4t" in text and "| after task | task 0 |" in text  # header, matrix grid

    html = check_html_embeds(run / "report.html", n_figures=len(referenced))
    assert "<td>73.00</td>" in html and "Accuracy matrix" in html and "Ranks" in html

    # the figures as TensorBoard images, in a run of their own beside the training curves
    events, scalars, images = scalar_and_image_tags(run / "tb" / "report")
    assert images == {f"report/{name}" for name in RUN_FIGURES | {"ranks"}}
    assert {"params/added", "params/cumulative", "eval/ms_per_image"} <= scalars
    assert [e.value for e in events.Scalars("params/cumulative")] == [12288, 21504, 36864, 43008]
    assert [e.step for e in events.Scalars("eval/ms_per_image")] == [0, 1, 2, 3]

    # writing the report again replaces the TensorBoard images instead of doubling them
    write_report_tensorboard(run / "tb" / "report", [run / "plots" / "params.png"], [1], [],
                             None, step=0)
    _, _, images = scalar_and_image_tags(run / "tb" / "report")
    assert images == {"report/params"}


def test_single_model_report_has_no_rank_figure(tmp_path):
    from cldist.report.report import write_report

    run = write_run(tmp_path / "seq_lora", method="seq_lora")
    report = write_report(run, tensorboard=False)
    referenced = markdown_figures(report)
    assert set(referenced) == {f"plots/{name}.png" for name in RUN_FIGURES}
    for relative in referenced:
        check_png((run / relative).read_bytes(), relative)
    check_html_embeds(run / "report.html", n_figures=len(RUN_FIGURES))
    assert not (run / "tb").exists()
    assert "Task-IL" not in report.read_text()  # written before Task-IL scoring: no section

    task_il = [[98.0], [97.0, 99.0], [96.5, 98.0, 97.0], [95.0, 97.5, 96.0, 99.5]]
    run = write_run(tmp_path / "with-task-il", method="seq_lora", task_il_acc=97.0,
                    task_il_forgetting=2.5, task_il_accuracy_matrix=task_il)
    text = write_report(run, tensorboard=False).read_text()
    assert "## Task-IL accuracy" in text and "97.0 % after the last task" in text
    assert "| 3 | 95.0 | 97.5 | 96.0 | 99.5 |" in text


def test_params_per_task_from_either_key():
    from cldist.report.report import params_added

    # `cldist run` stores the per-task list as params_added and their mean as params_per_task
    assert params_added({"accuracy_matrix": MATRIX, "params_per_task": 11000,
                         "params_added": [1, 2, 3, 4]}) == [1, 2, 3, 4]
    assert params_added({"accuracy_matrix": MATRIX, "params_per_task": 4096}) == [4096] * 4
    assert params_added(fake_metrics()) == [12288, 9216, 15360, 6144]


def test_rank_sources_per_method():
    from cldist.report.report import EVERY_LAYER, rank_grid

    matrix_only = {"accuracy_matrix": MATRIX}
    # PEARL / CoDyRA / InfLoRA: per-layer ranks in metrics.json
    grid, _ = rank_grid({**matrix_only, "ranks": pearl_ranks()}, {})
    assert grid["0"] == {} and grid["3"]["blocks.10.attn.qkv.k"] == 8
    # SD-LoRA-RR: one rank per task in state.json's task meta; KD: an absorbed task adds 0
    meta = {"0": {"rank": 10}, "1": {"rank": 10}, "2": {"rank": 8, "kd": {"absorbed": True}},
            "3": {"rank": 6}}
    grid, caption = rank_grid({**matrix_only, "ranks": {t: {} for t in meta}},
                              {"task_meta": meta})
    assert grid == {"0": {EVERY_LAYER: 10}, "1": {EVERY_LAYER: 10}, "2": {EVERY_LAYER: 0},
                    "3": {EVERY_LAYER: 6}}
    assert "absorbed" in caption
    # plain SD-LoRA (the same rank everywhere) and single-model baselines: no figure
    assert rank_grid(matrix_only, {"task_meta": {"0": {"rank": 10}, "1": {"rank": 10}}})[0] == {}
    assert rank_grid(matrix_only, {})[0] == {}


def test_eval_cost_is_placed_by_tasks_seen():
    from cldist.report.report import eval_cost

    chain = {"accuracy_matrix": MATRIX, "eval_seconds_per_image": [1, 2, 3, 4]}
    assert eval_cost(chain) == ([1.0, 2.0, 3.0, 4.0], [1, 2, 3, 4])
    # PEARL: tasks 1 and 2 finished together and were evaluated once
    together = {"accuracy_matrix": MATRIX, "eval_seconds_per_image": [1, 2, 3]}
    assert eval_cost(together) == ([1.0, 2.0, 3.0], None)
    assert eval_cost({**together, "eval_tasks_seen": [1, 3, 4]})[1] == [1, 3, 4]


def test_report_errors_name_the_problem(tmp_path):
    from cldist.report.report import write_report

    with pytest.raises(UserError, match="metrics.json"):
        write_report(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"method": "pearl"}))
    with pytest.raises(UserError, match="acc"):
        write_report(tmp_path)


# --------------------------------------------------------------------------- comparison

def test_comparison_two_methods_two_seeds_mean_and_std(tmp_path):
    from cldist.report.report import write_comparison

    runs = []
    for method, last_rows in (("pearl", ([58, 62, 84, 88], [60, 66, 86, 92])),
                              ("sdlora", ([50, 55, 80, 85], [52, 57, 82, 85]))):
        for seed, last in enumerate(last_rows):
            runs.append(write_run(tmp_path / f"{method}-s{seed}", method=method, seed=seed,
                                  matrix=MATRIX[:-1] + [last],
                                  ranks=pearl_ranks() if method == "pearl" else None))
    out = write_comparison(runs, tmp_path / "cmp" / "comparison.md")
    text = out.read_text()

    # Acc = mean of the last row: pearl seeds 73.0 and 76.0 -> 74.50 ± 2.12 (sample std, n-1)
    pearl_row = next(line for line in text.splitlines() if line.startswith("| pearl |"))
    assert pearl_row.startswith("| pearl | 2 | 4 | 74.50 ± 2.12 |")
    sdlora_row = next(line for line in text.splitlines() if line.startswith("| sdlora |"))
    assert sdlora_row.startswith("| sdlora | 2 | 4 | 68.25 ± 1.06 |")
    assert "| wall time |" in text and "2m06s ± 0.7s" in pearl_row
    for column in ("Acc", "AAA", "forgetting", "BWT", "params/task"):
        assert f" {column} |" in text
    assert "mean ± sample standard deviation" in text
    # every run is also listed on its own, with its seed
    assert "| pearl-s1 | pearl | 1 | 76.00 |" in text

    referenced = markdown_figures(out)
    assert set(referenced) == {"plots/comparison_avg_accuracy.png", "plots/comparison_params.png",
                               "plots/comparison_eval_time.png"}
    for relative in referenced:
        check_png((out.parent / relative).read_bytes(), relative)
    html = check_html_embeds(out.with_suffix(".html"), n_figures=3)
    assert "74.50 ± 2.12" in html


def test_grouping_ignores_seed_and_where_a_run_ran():
    from cldist.report.report import ComparedRun, configuration_of, group_by_configuration

    def run(name, seed, lr, address=""):
        config = {"method": {"name": "sdlora", "lr": lr}, "seed": seed, "run_dir": name,
                  "cluster": {"address": address}, "scenario": {"name": "d", "data_dir": name}}
        metrics = {"method": "sdlora"}
        return ComparedRun(None, name, metrics, configuration_of(config, metrics), seed)

    groups = group_by_configuration([run("a", 0, 1e-3), run("b", 1, 1e-3, "auto"),
                                     run("c", 0, 5e-4)])
    assert [[r.name for r in g.runs] for g in groups] == [["a", "b"], ["c"]]
    assert [g.label for g in groups] == ["sdlora (method.lr=0.001)", "sdlora (method.lr=0.0005)"]


def test_cli_report_prints_both_paths(tmp_path, capsys, monkeypatch):
    import cldist.report.report as report_module
    from cldist.cli import main

    calls = []

    def fake_write_report(run_dir, tensorboard=True):
        calls.append((run_dir, tensorboard))
        return tmp_path / "run" / "report.md"

    def fake_write_comparison(run_dirs, out_path):
        calls.append((list(run_dirs), out_path))
        return out_path

    monkeypatch.setattr(report_module, "write_report", fake_write_report)
    monkeypatch.setattr(report_module, "write_comparison", fake_write_comparison)
    run = tmp_path / "run"
    assert main(["report", str(run), "--no-tensorboard"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"report: {run / 'report.md'}",
                                                    f"report: {run / 'report.html'}"]
    assert calls == [(str(run), False)]
    assert main(["report", "a", "b"]) == 0  # default output: beside the first run
    assert capsys.readouterr().out.splitlines() == ["report: comparison.md",
                                                    "report: comparison.html"]
    assert main(["report", "a", "b", "--out", str(tmp_path / "c.html")]) == 2
    assert "--out" in capsys.readouterr().err
