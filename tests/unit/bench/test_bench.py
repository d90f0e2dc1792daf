"""`cldist bench step` and the GPU check (`cldist bench gpu`, launch/gpu-check.sh), on a CPU.

No timing is asserted: what is tested is that the benchmark compares equal work (the plain
loop, `fit` over the torch engine and over DeepSpeed train the same weights), the deferred NaN
check of `fit`, and the GPU check's logic end to end with tiny sizes - argument handling, the
JSON's shape, the MFU arithmetic, one failing or overrunning part leaving the others' figures.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cldist.bench import gpu
from cldist.bench.step import (StepClock, compare_steps, deepspeed_engine, fit_steps,
                               flops_per_step, lora_vit, memory_batches, plain_steps,
                               run_step_bench, torch_engine)
from cldist.methods.base import FitRequest
from cldist.train.loop import NonFiniteLoss, fit

TINY_STEP = {"model": "test_vit", "img_size": 16, "patch_size": 4, "rank": 2, "batch": 4,
             "steps": 2, "warmup": 1, "repeats": 2, "threads": 1, "budget_s": None}
REPO = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------- fit's loss check

def _linear_fit(batches, check_every, after_step=None):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    request = FitRequest("p", list(model.parameters()), 1, 0.1, nn.functional.cross_entropy,
                         weight_decay=0.0, after_step=after_step)
    return fit(model, request, lambda epoch: iter(batches), len(batches), torch_engine,
               torch.device("cpu"), check_every=check_every)


def _batches(n=6, nan_at=None):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        x = torch.randn(4, 3, generator=g)
        if i == nan_at:
            x[0, 0] = float("nan")
        out.append((x, torch.randint(0, 2, (4,), generator=g)))
    return out


def test_fit_reads_losses_in_batches_with_the_same_epoch_loss():
    every_step = _linear_fit(_batches(), check_every=1)
    every_four = _linear_fit(_batches(), check_every=4)  # 6 steps: a read at 4 and at the end
    assert every_four["losses"] == every_step["losses"]
    assert every_four["steps"] == every_step["steps"] == 6


@pytest.mark.parametrize("check_every,steps_run", [(1, 2), (4, 3), (32, 6)])
def test_a_nan_loss_names_its_own_step_however_late_it_is_read(check_every, steps_run):
    """check_every=1 stops before the bad step's update (as before); a larger one stops at the
    next read (after step 3 of 0..3, or at the epoch's end), still naming step 2."""
    done = []
    with pytest.raises(NonFiniteLoss, match=r"the loss became nan at step 2 with learning "
                                            r"rate 0\.1"):
        _linear_fit(_batches(nan_at=2), check_every, after_step=lambda s, t: done.append(s))
    assert done == list(range(steps_run))


# ---------------------------------------------------------------- cldist bench step

# slow: three full training loops, DeepSpeed's included (about 35 s on 2 cores); `make test`
@pytest.mark.slow
def test_the_three_loops_train_the_same_weights():
    """The benchmark compares equal work: plain loop, fit + torch engine, fit + DeepSpeed
    ZeRO-0 (whose all-reduce over one rank and whole-model zero_grad cldist drops) end with
    the same LoRA and head weights, and DeepSpeed leaves no gradient behind."""
    device = torch.device("cpu")
    batches = memory_batches(3, 4, 16)
    trained = []
    for run in (lambda m, p: plain_steps(m, p, batches, device, lambda s: None),
                lambda m, p: fit_steps(m, p, batches, device, lambda s: None, torch_engine),
                lambda m, p: fit_steps(m, p, batches, device, lambda s: None,
                                       deepspeed_engine(0, 4))):
        model, params = lora_vit("test_vit", 16, 4, rank=2)
        before = [p.detach().clone() for p in params]
        run(model, params)
        assert any(not torch.equal(a, b) for a, b in zip(before, params))
        assert all(p.grad is None for p in model.parameters())
        trained.append([p.detach().clone() for p in params])
    for other in trained[1:]:
        for a, b in zip(trained[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_clock_times_the_steps_after_warm_up():
    clock = StepClock(warmup=1, steps=2, device=torch.device("cpu"))
    for step in range(3):
        clock(step)
    assert clock.ms_per_step(0) >= 0 and clock.ms_per_step(1) >= 0
    short = StepClock(warmup=1, steps=2, device=torch.device("cpu"))
    short(0)
    with pytest.raises(RuntimeError, match="1 steps timed, expected 3"):
        short.ms_per_step()


def test_compare_steps_interleaves_and_stops_as_the_ranks_agree():
    order, asked = [], []

    def variant(label):
        def run(clock):
            order.append(label)
            for step in range(3):
                clock(step)
        return run

    def agree(stop):  # as if another rank had run out of budget after the second repeat
        asked.append(stop)
        return len(asked) == 2

    wall, cpu = compare_steps({"a": variant("a"), "b": variant("b")}, repeats=5, warmup=1,
                              steps=2, device=torch.device("cpu"), budget_s=1e9,
                              min_repeats=1, agree=agree)
    assert order == ["a", "b", "a", "b"] and asked == [False, False]
    assert len(wall["a"]) == len(cpu["b"]) == 2


# slow: starts the session's Ray cluster and a 2-worker Train job; `make test` runs it
@pytest.mark.slow
def test_step_bench_json_with_two_workers(tmp_path, ray_cluster):
    result = run_step_bench(tmp_path, TINY_STEP, {"repeats": 1, "steps": 2, "warmup": 1,
                                                  "budget_s": None})
    json.dumps(result)  # what run_benchmarks writes
    assert isinstance(result["ratio"], float) and result["ratio"] > 0
    assert isinstance(result["ratio_wall"], float)
    assert isinstance(result["zero2_two_workers_overhead_ms_per_step"], float)
    variants = [(r["variant"], r["workers"]) for r in result["rows"]]
    assert variants[0] == ("plain PyTorch loop (baseline)", 1)
    assert [w for _, w in variants] == [1, 1, 1, 2, 2, 2, 2]
    assert any("ZeRO-2" in v for v, _ in variants)
    for row in result["rows"]:
        assert row["wall_ms_per_step"] > 0 and row["cpu_ms_per_step"] >= 0
        assert row["repeats"] == (2 if row["workers"] == 1 else 1)
    assert result["rows"][0]["wall_vs_plain"] == 1.0


def test_step_and_gpu_are_registered_and_gpu_stays_out_of_the_suite():
    from cldist.bench import BENCHMARKS, IN_SUITE, _load_modules
    _load_modules()
    assert "step" in BENCHMARKS and "step" in IN_SUITE
    assert "gpu" in BENCHMARKS and "gpu" not in IN_SUITE


# ---------------------------------------------------------------- the GPU check's pieces

@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312)])
def test_peak_bf16_flops_per_card(name, tflops):
    assert gpu.peak_bf16_flops(name) == (tflops * 1e12, None)


def test_an_unknown_card_or_a_cpu_has_no_peak_and_says_why():
    peak, reason = gpu.peak_bf16_flops("NVIDIA GeForce GTX 1080")
    assert peak is None and "GTX 1080" in reason and "PEAK_BF16_TFLOPS" in reason
    peak, reason = gpu.peak_bf16_flops(None)
    assert peak is None and "not a CUDA device" in reason
    assert gpu.mfu(1e12, 10.0, None) is None


def test_mfu_of_a_known_flop_count():
    """Linear(8 -> 4), batch 2, input without grad: forward 2*2*8*4 = 128 FLOPs, the weight's
    gradient another 128; at 1 ms a step against a 1 MFLOP/s peak that is 256 000 x."""
    flops = flops_per_step(nn.Linear(8, 4), (torch.randn(2, 8), torch.tensor([0, 3])),
                           torch.device("cpu"))
    assert flops == 256
    assert gpu.mfu(flops, 1.0, 1e6) == pytest.approx(256.0 / 1e-3 / 1e6)
    # ViT-B/16-sized arithmetic: 3 TFLOP a step in 10 ms on a 989 TFLOPS card
    assert gpu.mfu(3e12, 10.0, 989e12) == pytest.approx(3e14 / 989e12)


def test_a_part_that_fails_or_overruns_leaves_an_error_and_the_rest_runs(tmp_path,
                                                                         monkeypatch):
    def boom(work, s, device, context):
        raise ValueError("no such kernel")

    def slow(work, s, device, context):
        time.sleep(30)
        return {}

    monkeypatch.setitem(gpu.PART_FUNCTIONS, "train", boom)
    monkeypatch.setitem(gpu.PART_FUNCTIONS, "stream", slow)
    monkeypatch.setitem(gpu.PART_FUNCTIONS, "scoring", lambda w, s, d, c: {"figure": 1.5})
    monkeypatch.setitem(gpu.SETTINGS["tiny"], "stream", {"budget_s": 0.5})
    out = tmp_path / "gpu.json"
    start = time.perf_counter()
    result = gpu.run_gpu_check(tmp_path, out, device="cpu", tiny=True)
    assert time.perf_counter() - start < 20
    written = json.loads(out.read_text())
    assert written["parts"] == json.loads(json.dumps(result["parts"]))
    train, stream, scoring = (written["parts"][p] for p in ("train", "stream", "scoring"))
    assert train["status"] == "error" and train["error"] == "ValueError: no such kernel"
    assert stream["status"] == "error" and "PartTimeout" in stream["error"]
    assert "budget of 0.5 s" in stream["error"]
    assert scoring == {"status": "ok", "figure": 1.5, "seconds": scoring["seconds"],
                       "budget_s": gpu.SETTINGS["tiny"]["scoring"]["budget_s"]}
    assert [r["part"] for r in written["rows"]] == ["train", "stream", "scoring"]


# slow: a whole inline stream and its scoring (about 45 s on 2 cores); `make test` runs it
@pytest.mark.slow
def test_scoring_falls_back_to_an_inline_run_when_the_ray_stream_failed(tmp_path,
                                                                         monkeypatch):
    def no_ray(work, s, device, context):
        raise RuntimeError("NCCL error: unhandled system error")

    monkeypatch.setitem(gpu.PART_FUNCTIONS, "stream", no_ray)
    result = gpu.run_gpu_check(tmp_path, None, device="cpu", tiny=True,
                               parts=("stream", "scoring"))
    assert result["parts"]["stream"]["status"] == "error"
    scoring = result["parts"]["scoring"]
    assert scoring["status"] == "ok", scoring
    assert scoring["run"].startswith("an inline run") and scoring["tasks"] == 3
    assert scoring["ensemble_images_per_s"] > 0 and scoring["routed_images_per_s"] > 0


def test_gpu_check_refuses_a_cpu_without_tiny_and_unknown_parts(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    assert gpu.main(["--out", str(tmp_path)]) == 2
    assert "--device cpu --tiny" in capsys.readouterr().err
    assert gpu.main(["--out", str(tmp_path), "--device", "cpu", "--tiny",
                     "--parts", "train,warp"]) == 2
    assert "unknown part(s) ['warp']" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


def test_launch_script_is_valid_bash_and_runs_the_module():
    script = REPO / "launch" / "gpu-check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "-m cldist.bench.gpu" in text and "gpu.json" in text


# slow: every part of the GPU check, a Ray stream included (minutes); `make test` runs it
@pytest.mark.slow
def test_gpu_check_tiny_on_cpu_runs_every_part(tmp_path, ray_cluster, capsys):
    """The whole check, every part for real, with test_vit on this CPU: the JSON a GPU run
    writes, with mfu null (no bf16 peak on a CPU) and the reason."""
    code = gpu.main(["--out", str(tmp_path / "out"), "--device", "cpu", "--tiny",
                     "--work", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert code == 0, json.dumps(result["parts"], indent=1)
    assert "gpu check JSON:" in printed
    assert result["device"] == "cpu" and result["device_name"] is None and result["tiny"]
    assert set(result["parts"]) == {"train", "stream", "scoring"}
    assert all(p["status"] == "ok" for p in result["parts"].values())

    train = result["parts"]["train"]
    assert isinstance(train["flops_per_step"], int) and train["flops_per_step"] > 0
    assert train["peak_flops"] is None and "not a CUDA device" in train["mfu_null_reason"]
    assert set(train["variants"]) == {"plain PyTorch loop", "cldist fit + DeepSpeed ZeRO-0"}
    for v in train["variants"].values():
        assert v["images_per_s"] > 0 and v["mfu"] is None and v["ms_per_step"] > 0
    assert train["precision"] == "fp32" and train["ratio"] > 0

    stream = result["parts"]["stream"]
    assert stream["n_tasks"] == 3 and "trainer.use_gpu=false" in stream["overrides"]
    assert "runner=ray" in stream["overrides"] and "method=pearl" in stream["overrides"]
    assert len(stream["train_s_per_task"]) == 3 and 0 <= stream["acc"] <= 100

    scoring = result["parts"]["scoring"]
    assert scoring["run"] == "the stream part's run (Ray runner)"
    assert scoring["run_dir"] == stream["run_dir"]
    assert scoring["tasks"] == 3 and scoring["test_images"] == 3 * 2 * 4
    assert scoring["ensemble_images_per_s"] > 0 and scoring["routed_images_per_s"] > 0
    assert scoring["forwards_per_image_ensemble"] == 3
    assert 1 < scoring["forwards_per_image_routed"] <= 3
    assert [r["status"] for r in result["rows"]] == ["ok"] * 3
