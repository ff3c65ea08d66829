"""Run directories (issue 13, finding 2): a new run never writes into another run's directory;
--resume-or-start continues a run or starts it, so a retried job (a KubeRay RayJob reruns the
same command into the same --run-dir) ends with one coherent run; checkpoints are pruned by
epoch number; Ctrl-C and SIGTERM checkpoint what they can and say how to resume."""

import dataclasses
import hashlib
import json
import re
import signal
import subprocess
import sys

import pytest
import torch

from learner import checkpoint

LAUNCH = """
import dataclasses, signal, sys
# A child inherits an ignored SIGINT (an earlier test's Ray leaves the suite's process so); a
# user's shell never does: take Ctrl-C as Python does by default.
signal.signal(signal.SIGINT, signal.default_int_handler)
import learner.run as run
from ddpo.config import SampleConfig, TrainConfig, override
preset = run.task_config
def small(task, model="tiny"):  # the tiny preset shrunk to about a second an epoch
    return override(preset(task, model), {
        "sample": SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        "train": TrainConfig(learning_rate=1e-2, clip_range=0.1, batch_size=4),
        "grid_prompts": 2, "grid_seeds": 2, "run.eval_every": 0,
    })
run.task_config = small
# Half a second after each epoch's line, so that a signal sent on reading it lands in the run
# (epochs of this size take about as long as the reader needs to react).
import time, learner.runlog as runlog
record = runlog.RunLog.record
runlog.RunLog.record = lambda self, r: (record(self, r), time.sleep(0.5))[0]
run.main(sys.argv[1:])
"""


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread a step: these runs check files, not numbers, and a second thread only
    slows them down when the cores are shared."""
    monkeypatch.setenv("DDPO_THREADS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def small_config(run_dir, **changes):
    from ddpo.config import SampleConfig, TrainConfig, override
    from ddpo.presets import task_config

    settings = {
        "run.dir": run_dir,
        "run.eval_every": 0,
        "sample": SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        "train": TrainConfig(learning_rate=1e-2, clip_range=0.1, batch_size=4),
        "grid_prompts": 2,
        "grid_seeds": 2,
    }
    return override(task_config("compressibility", "tiny"), settings | changes)


def fake_run(run_dir, epochs=(5, 10, 15), **changes):
    """A run directory as a run leaves it: config.json, metrics and checkpoints whose state.json
    passes every check (the tensors are stand-ins: nothing here loads a model)."""
    config = small_config(run_dir, **changes)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), default=str))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    for epoch in epochs:
        state = {
            "learner": {
                "version": epoch,
                "optimizer": {"param_groups": [{"params": [0]}], "scalars": {}},
                "trained_batches": [],
            },
            "driver": {"tracker": {}, "lost_batches": 0, "logs": {}},
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        }
        tensors = {"lora.w": torch.zeros(2)}
        checkpoint.save(run_dir, epoch, tensors, state, [], keep=10)
    return config


def digests(run_dir):
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def test_a_new_run_into_another_runs_directory_is_refused(tmp_path, cli_error):
    """Finding 2: a fresh run into an old run's directory overwrote its config.json, deleted its
    epoch-000000 and pruned its own new checkpoint (name order put the old 5/10/15 after it)."""
    old = tmp_path / "old"
    fake_run(old)
    before = digests(old)
    line = cli_error(["--run-dir", str(old), "--in-process"])
    assert "already holds a run (checkpoint at epoch 15)" in line
    assert f"--resume {old}" in line and "another --run-dir" in line
    assert digests(old) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    assert "already holds files" in cli_error(["--run-dir", str(other)])


def test_checkpoints_are_pruned_and_found_by_epoch_number(tmp_path):
    tensors, state = {"w": torch.zeros(1)}, {"learner": {}, "driver": {}, "config": {}}
    for epoch in (999_998, 999_999, 1_000_000):  # by name, epoch-1000000 sorts first
        checkpoint.save(tmp_path, epoch, tensors, state, [], keep=2)
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["epoch-999999", "epoch-1000000"]
    assert checkpoint.latest(tmp_path).epoch == 1_000_000
    # A resume that went on from epoch 2 (epoch 5 failed its check): the next checkpoint
    # replaces the abandoned future, never the other way round.
    run = tmp_path / "resumed"
    for epoch in (1, 2, 5):
        checkpoint.save(run, epoch, tensors, state, [], keep=2)
    (checkpoint.checkpoint_dir(run) / "epoch-000005" / checkpoint.MANIFEST).unlink()
    checkpoint.save(run, 3, tensors, state, [], keep=2)
    assert [p.name for p in checkpoint.checkpoints(run)] == ["epoch-000002", "epoch-000003"]


def test_resume_or_start_continues_only_the_same_run(tmp_path, cli_error):
    from learner.run import parse, plan

    run_dir = tmp_path / "run"
    fake_run(run_dir, epochs=(0, 1))
    small = small_config(run_dir)
    # The same settings: it continues from the newest checkpoint.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("learner.run.task_config", lambda task, model: small)
        config, ckpt = plan(parse(["--run-dir", str(run_dir), "--resume-or-start"]))
        assert ckpt.epoch == 1 and config == small
        # Other settings: refused, naming them.
        before = digests(run_dir)
        line = cli_error(["--resume-or-start", "--run-dir", str(run_dir), "--seed", "3"])
        assert "holds a run with other settings (seed)" in line and digests(run_dir) == before
        # An attempt at this run that stopped before checkpoint 0 is started over; a directory
        # of something else is not.
        attempt = tmp_path / "attempt"
        fake_run(attempt, epochs=())
        (attempt / "eval.jsonl").write_text('{"when": "start"}\n')
        config, ckpt = plan(parse(["--run-dir", str(attempt), "--resume-or-start"]))
        assert ckpt is None and config.run.dir == attempt
        (attempt / "config.json").write_text("{}")
        line = cli_error(["--resume-or-start", "--run-dir", str(attempt)])
        assert "already holds files" in line


def test_ctrl_c_checkpoints_the_epochs_done_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C while epoch 2 samples: checkpoint 2 is written (save_every is 10), samples.jsonl
    loses the unfinished epoch's lines, and one line says how to go on; exit status 130."""
    from learner.driver import Driver
    from learner.run import main

    real = Driver.collect

    def collect_then_ctrl_c(self, epoch, *args):
        got = real(self, epoch, *args)
        if epoch == 2:
            raise KeyboardInterrupt  # epoch 2's samples are logged, its update not yet made
        return got

    monkeypatch.setattr(Driver, "collect", collect_then_ctrl_c)
    monkeypatch.setattr("learner.run.task_config", lambda task, model: small_config(None))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--run-dir", str(run_dir), "--epochs", "4", "--save-every", "10", "--in-process"])
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at epoch 2; resume with: python -m learner.run --resume {run_dir}"
    )
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["epoch-000000", "epoch-000002"]
    samples = [json.loads(s)["epoch"] for s in (run_dir / "samples.jsonl").open()]
    assert samples == [0] * 8 + [1] * 8
    assert [m["epoch"] for m in checkpoint.latest(run_dir).metrics] == [0, 1]


@pytest.mark.slow
def test_a_retried_job_ends_with_one_coherent_run(tmp_path):
    """What a RayJob retry does: the same command again into one --run-dir. The first attempt
    is killed (SIGKILL, as a lost pod) after two epochs, the second is stopped (SIGTERM, as a
    stopped or preempted pod; it checkpoints as Ctrl-C does) after one more, the third finishes;
    the directory then holds one run, every epoch once."""
    launch = tmp_path / "launch.py"
    launch.write_text(LAUNCH)
    run_dir = tmp_path / "run"
    command = [sys.executable, str(launch), "--in-process", "--resume-or-start"]
    command += ["--run-dir", str(run_dir), "--epochs", "5", "--save-every", "1"]

    def attempt(stop_after, sig):
        """Run the command until it has printed `stop_after` epochs, then send `sig`."""
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
            epochs = 0
            for line in proc.stdout:  # read to the end: a closed pipe would fail its prints
                epochs += line.startswith("epoch ")
                if sig is not None and epochs == stop_after:
                    proc.send_signal(sig)
            code = proc.wait(timeout=300)
        return code, (tmp_path / "stderr.txt").read_text()

    code, _ = attempt(2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    config = json.loads((run_dir / "config.json").read_text())
    code, err = attempt(1, signal.SIGTERM)  # what a pod gets when it is stopped or preempted
    assert code == 143 and "Traceback" not in err, err[-3000:]
    stop = re.fullmatch(
        r"terminated at epoch (\d+); resume with: python -m learner.run --resume (.+)",
        err.splitlines()[-1],
    )
    assert stop and stop[2] == str(run_dir) and int(stop[1]) == checkpoint.latest(run_dir).epoch
    code, err = attempt(None, None)
    assert code == 0, err[-3000:]

    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").open()]
    assert (
        [m["epoch"] for m in metrics] == [m["policy_version"] for m in metrics] == [0, 1, 2, 3, 4]
    )
    samples = [json.loads(s)["epoch"] for s in (run_dir / "samples.jsonl").open()]
    assert samples == sorted(samples) and [samples.count(e) for e in range(5)] == [8] * 5
    assert [json.loads(s)["when"] for s in (run_dir / "eval.jsonl").open()] == ["start", "end"]
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == [
        f"epoch-{e:06d}" for e in (3, 4, 5)
    ]
    assert checkpoint.latest(run_dir).metrics == metrics
    assert json.loads((run_dir / "config.json").read_text()) == config
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_ray_init_keeps_the_drivers_own_sigterm_handler():
    """ray.init sets a SIGTERM handler that exits on the spot; the driver's own (a checkpoint,
    then Ray's atexit hook stops the local instance) must survive it. A process without a
    handler of its own keeps Ray's."""
    from learner.wiring import own_sigterm_handler

    def ours(signum, frame):
        pass

    def rays(signum, frame):
        pass

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, ours)
        with own_sigterm_handler():
            signal.signal(signal.SIGTERM, rays)  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) is ours
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with own_sigterm_handler():
            signal.signal(signal.SIGTERM, rays)
        assert signal.getsignal(signal.SIGTERM) is rays
    finally:
        signal.signal(signal.SIGTERM, previous)
