"""End to end, the demo preset learns, judged against both controls.

The runs go through the driver's own code path (`Driver`, the samplers, reward workers and
learner) with the `InProcess` wiring, as bench/learning.py measures them: the same computation
as through Ray, without its per-call overhead (the suite's time budget). The shuffled control
runs in a second process, at the same time as the run. Runs through
Ray are tested in test_tasks_e2e.py (every task), test_job_submission.py (the demo as a Ray job)
and test_faults.py.

The measure is the run's evaluation (eval.jsonl): the reward of the same 48 samples (6 prompts
x 8 fixed seeds, the same noise) under the starting and the final weights, compared sample by
sample (paired). Two controls:
- shuffled advantages (`ShuffledDriver`): the same run with each epoch's advantages permuted
  across its samples, so the weights move as much with no signal. Weight drift lowers the JPEG
  compressibility reward, so this control is the one that tells learning from moving;
- lr 0: the weights never move, so the evaluation does not change at all.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpo.config import override
from ddpo.presets import task_config
from learner.driver import Driver
from learner.evaluation import paired_gain, read_evals
from learner.shuffled import ShuffledDriver
from learner.wiring import InProcess

EPOCHS = 10  # an eighth of the preset's 80: the suite's time budget
# Measured on this preset (BENCHMARKS.md, "A CPU screen past 60 epochs, and the new
# compressibility preset", one process, two threads): by epoch 10 two seeds of five had not
# moved yet (the adapters on every layer start slowly); by epoch 30 every seed had gained with
# t >= 7.2 and cleared its shuffled control by t >= 7.7. This test's own draw (seed 0, one
# thread a process, 2026-11-28): at 10 epochs gain +0.041 (t 7.3), the control +0.019 (t 4.7),
# the margin +0.023 (t 4.2). With a fixed thread count the run is deterministic, so the issue's
# t >= 3 for both is checked against that one draw.
MIN_T_GAIN = 3.0
MIN_T_MARGIN = 3.0
# The run and its shuffled control train at the same time, one thread each, one per core: 170 s
# for 10 epochs on the slower machines with the attention-only adapters, 84 s on the faster
# with these (a thread alone is 1.2-1.5x slower than two, "Sharing the machine" in
# BENCHMARKS.md).
CONTROL_IN_A_SECOND_PROCESS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_e2e import run
run(Path(sys.argv[2]), int(sys.argv[3]), shuffled=True)
"""


def run(run_dir, epochs, learning_rate=None, shuffled=False):
    config = task_config("compressibility", "tiny")
    train = config.train
    if learning_rate is not None:
        train = dataclasses.replace(train, learning_rate=learning_rate)
    config = override(config, {"run.epochs": epochs, "seed": 0, "run.dir": run_dir, "train": train})
    # What is judged here is the training prompts' start and end: the held-out prompts (tested
    # in test_learner and test_guard) and the middle evaluations (test_guard) would only cost
    # time.
    config = dataclasses.replace(config, heldout_prompts=())
    config = override(config, {"run.eval_every": 0})
    history = (ShuffledDriver if shuffled else Driver)(config, InProcess()).run()
    return history, read_evals(run_dir)


def start_shuffled_control(run_dir: Path, epochs: int) -> tuple[subprocess.Popen, Path]:
    log = run_dir.parent / "shuffled.log"
    args = [str(Path(__file__).parent), str(run_dir), str(epochs)]
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", CONTROL_IN_A_SECOND_PROCESS, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, log


@pytest.mark.slow
def test_demo_preset_learns_against_shuffled_and_lr0_controls(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPO_THREADS", "1")  # both processes, one thread each
    control_run, control_log = start_shuffled_control(tmp_path / "shuffled", EPOCHS)
    try:
        check_demo_against_controls(tmp_path, control_run, control_log)
    finally:
        control_run.kill()  # nothing if it has ended; else a failed check leaves no stray run


def check_demo_against_controls(tmp_path, control_run, control_log):
    history, evals = run(tmp_path / "trained", EPOCHS)
    lines = [json.loads(s) for s in (tmp_path / "trained/metrics.jsonl").read_text().splitlines()]
    keys = {"epoch", "policy_version", "reward_mean", "reward_std", "loss", "approx_kl"}
    assert lines == history and len(lines) == EPOCHS and keys | {"clipfrac"} <= lines[0].keys()
    assert [r["policy_version"] for r in lines] == list(range(EPOCHS))
    for name in (
        "config.json",
        "grid_start.png",
        "grid_end.png",
        "index.html",
        "reward_curve.png",
        "lora/pytorch_lora_weights.safetensors",
    ):
        assert (tmp_path / "trained" / name).is_file(), name
    # Start and end, each with every sample's reward.
    assert [e["when"] for e in evals] == ["start", "end"]
    assert all(len(e["rewards"]) == e["samples"] == 48 for e in evals)
    assert evals[-1]["policy_version"] == EPOCHS
    start, end = evals[0]["rewards"], evals[-1]["rewards"]
    gain = paired_gain(start, end)
    assert gain["mean"] > 0 and gain["t"] >= MIN_T_GAIN, gain

    # Shuffled advantages: the same samples (bit for bit at the start), as much movement, no
    # signal. The trained weights beat the control's on the same samples.
    assert control_run.wait(timeout=600) == 0, control_log.read_text()[-3000:]
    shuffled = read_evals(tmp_path / "shuffled")
    assert shuffled[0]["rewards"] == start
    control = paired_gain(start, shuffled[-1]["rewards"])
    margin = paired_gain(shuffled[-1]["rewards"], end)
    assert margin["mean"] > 0 and margin["t"] >= MIN_T_MARGIN, (gain, control, margin)

    # lr 0: the weights never move, so one update shows it as well as all of them.
    _, frozen = run(tmp_path / "frozen", 1, learning_rate=0.0)
    assert frozen[0]["rewards"] == start
    assert np.array_equal(frozen[-1]["rewards"], start), frozen


def test_a_sync_run_through_ray_is_the_in_process_run_bit_for_bit(
    small_config_in, tmp_path, ray_instance
):
    """What lets this file and bench/learning.py measure learning in one process: with fixed
    thread counts (DDPO_THREADS=fixed, conftest.py), a sync run of the demo's training settings
    through Ray (samplers, reward workers and learner as actors) samples the same rewards,
    trains the same LoRA weights and evaluates the same samples as in one process, bit for bit.
    Runs of either path that differ in their last digits only differ in their thread counts."""
    from safetensors.torch import load_file

    from learner.driver import train

    demo = task_config("compressibility", "tiny").train
    runs = {}
    for name, wiring in (("ray", None), ("one process", InProcess())):
        run_dir = tmp_path / name.replace(" ", "_")
        config = small_config_in(
            run_dir,
            train=dataclasses.replace(demo, batch_size=4),
            **{"run.epochs": 3, "run.eval_every": 2},
        )
        history = train(config, wiring)
        lora = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
        runs[name] = history, read_evals(run_dir), lora

    (ray_history, ray_evals, ray_lora), (history, evals, lora) = runs["ray"], runs["one process"]
    for key in ("reward_mean", "loss", "approx_kl", "clipfrac"):
        assert [h[key] for h in ray_history] == [h[key] for h in history], key
    assert [e["when"] for e in evals] == ["start", 2, "end"]
    assert [e["rewards"] for e in ray_evals] == [e["rewards"] for e in evals]
    assert evals[-1]["rewards"] != evals[0]["rewards"]  # the weights moved
    assert ray_lora.keys() == lora.keys()
    assert all(torch.equal(ray_lora[k], lora[k]) for k in lora)
