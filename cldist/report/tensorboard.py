"""TensorBoard logging for a run (`RUN/tb/`), safe to call from concurrent task threads.

Tag layout (what users filter on in TensorBoard):
- `train/task_{TTT}/{phase}/loss`, `train/task_{TTT}/{phase}/lr`  step = global optimiser step
- `eval/acc_task_{j}`, `eval/acc`, `eval/aaa`                     step = task id just finished
- `eval/{routed,ensemble}/acc_task_{j}`, `eval/{rule}/acc`         sub-network methods: both
                                                                   Class-IL rules (step = task id)
- `ranks/{layer}`, `ranks/total`                                   step = task id
- `hparam/{metric}` plus the HParams plugin record                 written once at the end
Task ids in train tags are zero-padded to three digits (`task_003`) so they sort in the UI.

`cldist report` adds a second TensorBoard run, `RUN/tb/report/` (see report.py): the report's
figures as images `report/{figure}`, and `params/added`, `params/cumulative`,
`eval/ms_per_image` by task.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from cldist.report.summary import flatten_config


class TensorBoardLogger:
    """A `SummaryWriter` behind a lock, with cldist's tag names.

    Every method takes the lock, so task threads (or a progress callback) can share one logger.
    `log_task_row` flushes, so a crashed run keeps every finished task's curves.
    """

    def __init__(self, log_dir: str | Path, flush_secs: int = 30):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ training

    def log_epoch(self, task_id: int, phase: str, epoch: int, global_step: int,
                  loss: float, lr: float | None) -> None:
        """End-of-epoch training loss and learning rate of one task's phase (e.g. `stage2`).

        `epoch` is recorded as `train/task_{TTT}/{phase}/epoch` so the x axis (global step) can
        be mapped back to epochs. `lr` None (not known) writes no lr point rather than a
        misleading 0.
        """
        prefix = f"train/task_{int(task_id):03d}/{phase}"
        with self._lock:
            self._check_open()
            self._writer.add_scalar(f"{prefix}/loss", float(loss), int(global_step))
            if lr is not None:
                self._writer.add_scalar(f"{prefix}/lr", float(lr), int(global_step))
            self._writer.add_scalar(f"{prefix}/epoch", float(epoch), int(global_step))

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        """Any other scalar (e.g. `eval/seconds_per_image`)."""
        with self._lock:
            self._check_open()
            self._writer.add_scalar(tag, float(value), int(step))

    # ------------------------------------------------------------------ evaluation

    def log_task_row(self, task_id: int, row: Sequence[float], acc: float, aaa: float,
                     task_il_acc: float | None = None) -> None:
        """One accuracy-matrix row after task `task_id`, plus Acc/AAA so far; then flush.

        `eval/acc_task_{j}` (j unpadded) at step `task_id` traces task j's accuracy over the
        stream, which is where forgetting shows; `eval/task_il_acc` is the accuracy after the
        task with the task id given (cldist.eval.scoring).
        """
        step = int(task_id)
        with self._lock:
            self._check_open()
            for j, accuracy in enumerate(row):
                self._writer.add_scalar(f"eval/acc_task_{j}", float(accuracy), step)
            self._writer.add_scalar("eval/acc", float(acc), step)
            self._writer.add_scalar("eval/aaa", float(aaa), step)
            if task_il_acc is not None:
                self._writer.add_scalar("eval/task_il_acc", float(task_il_acc), step)
            self._writer.flush()

    def log_rule_row(self, rule: str, task_id: int, row: Sequence[float], acc: float) -> None:
        """A sub-network method's accuracy row under one Class-IL rule (`routed`, `ensemble`):
        `eval/{rule}/acc_task_{j}` and `eval/{rule}/acc` at step `task_id`, so both rules'
        curves lie side by side whichever one `eval/acc` reports."""
        step = int(task_id)
        with self._lock:
            self._check_open()
            for j, accuracy in enumerate(row):
                self._writer.add_scalar(f"eval/{rule}/acc_task_{j}", float(accuracy), step)
            self._writer.add_scalar(f"eval/{rule}/acc", float(acc), step)
            self._writer.flush()

    def log_ranks(self, task_id: int, ranks: Mapping[str, int]) -> None:
        """Per-layer LoRA ranks chosen for task `task_id` and their sum."""
        step = int(task_id)
        with self._lock:
            self._check_open()
            for layer, rank in ranks.items():
                self._writer.add_scalar(f"ranks/{layer}", float(rank), step)
            self._writer.add_scalar("ranks/total", float(sum(ranks.values())), step)

    def log_hparams(self, hparams: Mapping[str, Any], final_metrics: Mapping[str, Any]) -> None:
        """Record the run's hyper-parameters and final metrics in the HParams plugin.

        Nested dicts are flattened with dots (`trainer.epochs`); values TensorBoard cannot hold
        (lists, None) become strings. Only numeric final metrics are kept, under
        `hparam/{name}` so they do not collide with the `eval/...` curves. Written into this
        run's own event file rather than a timestamped sub-directory (`add_hparams`' default).
        """
        flat_hparams = {key: _hparam_value(value)
                        for key, value in flatten_config(dict(hparams)).items()}
        metric_tags = {f"hparam/{name}": float(value) for name, value in final_metrics.items()
                       if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)}
        experiment, session_start, session_end = hparams_summary(flat_hparams, metric_tags)
        with self._lock:
            self._check_open()
            file_writer = self._writer._get_file_writer()
            for summary in (experiment, session_start, session_end):
                file_writer.add_summary(summary)
            for tag, value in metric_tags.items():
                self._writer.add_scalar(tag, value, 0)
            self._writer.flush()

    # ------------------------------------------------------------------ figures

    def log_figure(self, tag: str, png_path_or_fig, step: int) -> None:
        """An image: a PNG file path or a matplotlib `Figure` (rendered with Agg)."""
        image = _figure_to_array(png_path_or_fig)
        with self._lock:
            self._check_open()
            self._writer.add_image(tag, image, int(step), dataformats="HWC")

    # ------------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._writer.flush()

    def close(self) -> None:
        """Flush and close; further calls to `close` are no-ops."""
        with self._lock:
            if not self._closed:
                self._writer.flush()
                self._writer.close()
                self._closed = True

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TensorBoardLogger({self.log_dir}) is closed")


def _hparam_value(value: Any):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, str, int, float)):
        return value
    return str(value)


def _figure_to_array(png_path_or_fig) -> np.ndarray:
    """HWC uint8 RGB array from a PNG path or a matplotlib Figure."""
    if isinstance(png_path_or_fig, (str, Path)):
        from PIL import Image  # pillow ships with matplotlib

        with Image.open(png_path_or_fig) as image:
            return np.asarray(image.convert("RGB"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # Render without pyplot so no global backend state is touched.
    canvas = FigureCanvasAgg(png_path_or_fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
