"""Reporting: summary tables, atomic JSON, TensorBoard tags, progress lines, report.md + plots."""
import json
import re
import threading
import time

import pytest

from cldist.errors import UserError
from cldist.report.progress import Progress, format_status_line
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
    (loss,) = events.Scalars("train/task_003/stage2/loss")
    assert loss.step == 10 and loss.value == pytest.approx(0.53)
    (total,) = events.Scalars("ranks/total")
    assert total.step == 1 and total.value == 10
    (acc_task_1,) = events.Scalars("eval/acc_task_1")
    assert acc_task_1.step == 1 and acc_task_1.value == pytest.approx(70.0)


def test_tensorboard_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cldist.report import plots
    from cldist.report.tensorboard import TensorBoardLogger

    png = plots.plot_forgetting([3.0, 1.0], tmp_path / "f.png")
    with TensorBoardLogger(tmp_path / "tb") as logger:
        logger.log_figure("plots/forgetting", png, step=1)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "plots/forgetting" in events.Tags()["images"]


# --------------------------------------------------------------------------- progress

class CharByCharStream:
    """A stream that stores each character separately and yields the GIL in between.

    Without a lock around whole lines, concurrent writers would interleave inside lines.
    """

    def __init__(self):
        self.chars = []

    def write(self, text):
        for char in text:
            self.chars.append(char)
            if char == " ":
                time.sleep(0)  # releases the GIL: let the other thread run mid-line
        return len(text)

    def flush(self):
        pass

    def getvalue(self):
        return "".join(self.chars)


def test_progress_lines_from_two_threads_never_interleave():
    stream = CharByCharStream()
    progress = Progress(n_tasks=2, stream=stream)
    n_epochs = 150

    def train(task_id):
        progress.task_started(task_id)
        for epoch in range(1, n_epochs + 1):
            progress.epoch(task_id, "stage2", epoch, n_epochs, loss=0.5312, lr=9.5e-4)
        progress.task_finished(task_id, seconds=1.0)

    threads = [threading.Thread(target=train, args=(t,)) for t in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    epoch_line = re.compile(r"\[task 00[01] \| stage2 \| epoch \d+/150\] loss 0\.5312  "
                            r"lr 9\.5e-04  \d+\.\ds")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 * (n_epochs + 3)  # started + epochs + finished + status per task
    for line in lines:
        assert (epoch_line.fullmatch(line)
                or re.fullmatch(r"\[task 00[01]\] (started|finished in 1\.0s)", line)
                or line.startswith("[progress] tasks: ")), line
    assert lines[-1] == "[progress] tasks: 2/2 done | running: - | queued: - | ETA 0.0s"


def test_status_line_and_eta():
    assert format_status_line(2, 5, [3, 4], [5], 80) == \
        "tasks: 2/5 done | running: 3,4 | queued: 5 | ETA 1m20s"
    now = [0.0]
    progress = Progress(n_tasks=5, stream=CharByCharStream(), clock=lambda: now[0])
    assert progress.eta_seconds() is None
    assert progress.status().endswith("ETA ?")
    progress.task_started(0)
    progress.task_started(1)
    now[0] = 60.0
    progress.task_finished(0)
    progress.task_finished(1)
    progress.task_started(2)
    progress.task_started(3)
    now[0] = 80.0
    # mean 60 s; running 2,3 have 40 s left each, task 4 queued: (40 + 40 + 60) / 2 = 70 s
    assert progress.eta_seconds() == pytest.approx(70.0)
    assert progress.status() == "tasks: 2/5 done | running: 2,3 | queued: 4 | ETA 1m10s"


def test_message_prefixes_every_line():
    stream = CharByCharStream()
    Progress(1, stream=stream).message("first\nsecond")
    assert stream.getvalue() == "[cldist] first\n[cldist] second\n"


# --------------------------------------------------------------------------- report.md

def _check_pngs(report_md, base):
    text = report_md.read_text()
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert referenced
    for relative in referenced:
        png = base / relative
        assert png.is_file(), relative
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE), relative
        assert len(data) > 2048, relative
    return text, referenced


def test_report_from_fabricated_run_dir(tmp_path):
    from cldist.report.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    ranks = {str(t): {f"blocks.{b}.attn.k": 2 + b + t for b in (0, 1, 2, 10)} for t in range(4)}
    metrics = fake_metrics(ranks=ranks, eval_seconds_per_image=[0.002, 0.004, 0.006, 0.008],
                           scenario="digits_4t")
    (run / "metrics.json").write_text(json.dumps(metrics))

    report = write_report(run)
    assert report == run / "report.md"
    text, referenced = _check_pngs(report, run)
    assert {"plots/accuracy_matrix.png", "plots/avg_accuracy.png", "plots/forgetting.png",
            "plots/ranks.png", "plots/params.png", "plots/eval_time.png"} <= set(referenced)
    assert "| pearl | 4 | 73.00 | 76.50 |" in text
    assert "digits_4t" in text


def test_report_without_optional_keys(tmp_path):
    from cldist.report.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(fake_metrics(params_per_task=4096)))
    _, referenced = _check_pngs(write_report(run), run)
    assert "plots/ranks.png" not in referenced and "plots/eval_time.png" not in referenced


def test_report_errors_name_the_problem(tmp_path):
    from cldist.report.report import write_report

    with pytest.raises(UserError, match="metrics.json"):
        write_report(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"method": "pearl"}))
    with pytest.raises(UserError, match="acc"):
        write_report(tmp_path)


def test_comparison_report(tmp_path):
    from cldist.report.report import write_comparison

    for name, method, last in (("a", "pearl", MATRIX[-1]), ("b", "sdlora", [50, 55, 80, 85])):
        run = tmp_path / name
        run.mkdir()
        matrix = MATRIX[:-1] + [last]
        (run / "metrics.json").write_text(json.dumps(fake_metrics(method,
                                                                  accuracy_matrix=matrix)))
    out = write_comparison([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp" / "compare.md")
    text, referenced = _check_pngs(out, out.parent)
    assert referenced == ["plots/compare_avg_accuracy.png"]
    assert "| a | pearl |" in text and "| b | sdlora |" in text
