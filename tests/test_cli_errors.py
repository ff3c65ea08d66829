"""Mistakes on the command line or in a checkpoint cost one line and exit status 2, before the
run directory is created or an actor starts, and never change a run that exists (issue 13,
finding 7, and what a resume reads from state.json)."""

import hashlib
import json
import re
import shutil

import pytest
import torch

from ddpo.config import override
from learner import checkpoint


def small(task, model="tiny"):
    """The tiny preset shrunk to seconds a run (what tests/conftest.py's small_config uses)."""
    from ddpo.config import SampleConfig, TrainConfig, override
    from ddpo.presets import task_config

    return override(
        task_config(task, model),
        {
            "sample": SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
            "train": TrainConfig(learning_rate=1e-2, clip_range=0.1, batch_size=4),
            "grid_prompts": 2,
            "grid_seeds": 2,
            "run.eval_every": 0,
        },
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--reward", "aesthetic", "--reward-workers", "aesthetic=0"], "at least one actor"),
        (["--reward-workers", "nonsense"], "must look like NAME=VALUE"),
        (["--reward-workers", "jpeg_compressibility=two"], "whole number of actors"),
        (["--reward-workers", "aesthetic=2"], "name one of its terms"),
        (["--reward-workers-range", "jpeg_compressibility=3:1"], "min <= start <= max"),
        (["--reward", "nonsense"], "unknown reward 'nonsense'"),
        (["--reward-model", "foo=bar"], r"reward option\(s\) foo not taken"),
        (["--model", "./no/such/model"], "neither `tiny`, an existing directory, nor a hub id"),
        (["--seed", "-5"], r"seed=-5 must be in \[0, 2\*\*63\)"),
        (["--epochs", "0"], "at least 1 epoch"),
        (["--eval-every", "-1"], "must be >= 0"),
        (["--train.target-kl", "-0.1"], r"target_kl=-0.1 must be >= 0 \(0 turns it off\)"),
        (["--train.steps-per-call", "0"], r"train.steps_per_call=0 must be at least 1"),
        (["--resume-or-start", "--save-every", "0"], "needs checkpoints"),
    ],
)
def test_a_bad_flag_is_one_line_before_the_run_directory_exists(argv, says, tmp_path, cli_error):
    run_dir = tmp_path / "run"
    line = cli_error([*argv, "--run-dir", str(run_dir)])
    assert re.search(says, line), line
    assert not run_dir.exists()
    assert "needs --run-dir" in cli_error(["--resume-or-start"])


@pytest.mark.parametrize(
    "line, says",
    [("a" * 1_000_000, "1000000 characters long"), ("bad\x00prompt", r"control character '\\x00'")],
    ids=["1MB-line", "NUL"],
)
def test_a_bad_prompt_is_one_line_naming_its_line(line, says, tmp_path, cli_error):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat\n{line}\n")
    run_dir = tmp_path / "run"
    error = cli_error(["--prompts", str(prompts), "--run-dir", str(run_dir)])
    assert f"{prompts}, line 2" in error and re.search(says, error)
    assert not run_dir.exists()


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, cli_error):
    assert "is not a directory" in cli_error(["--run-dir", "/dev/null"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "is not a directory" in cli_error(["--run-dir", str(blocker / "run")])
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    probe = read_only / "probe"
    try:  # root writes anyway; /proc refuses even root
        probe.mkdir()
        probe.rmdir()
        read_only = "/proc"
    except PermissionError:
        pass
    line = cli_error(["--run-dir", f"{read_only}/run"])
    assert "cannot write in" in line and "give a writable --run-dir" in line


# ----- a damaged or tampered checkpoint -----
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real one-epoch tiny run with checkpoints 0 and 1."""
    from learner.driver import train
    from learner.wiring import InProcess

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDPO_THREADS", "1")  # files matter here, not numbers
        config = override(small("compressibility"), {"run.epochs": 1, "run.dir": run_dir})
        train(config, InProcess())
    torch.set_num_threads(threads)
    assert checkpoint.latest(run_dir).epoch == 1
    return run_dir


def tamper(ckpt, state=None, tensors=None):
    """Rewrite a checkpoint's state.json or tensors and its manifest to match (as someone who
    edits it on purpose would), so that only the resume's own checks can catch it."""
    if state is not None:
        (ckpt / checkpoint.STATE).write_text(json.dumps(state))
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, ckpt / checkpoint.TENSORS)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    for name in (checkpoint.STATE, checkpoint.TENSORS):
        manifest["files"][name] = checkpoint._digest(ckpt / name)
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def digests(run_dir):
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def epoch_abc(state, tensors):
    state["epoch"] = "abc"


def epoch_negative(state, tensors):
    state["epoch"] = -5


def epoch_huge(state, tensors):
    state["epoch"] = 10**18


def no_learner(state, tensors):
    del state["learner"]


def no_tracker(state, tensors):
    del state["driver"]["tracker"]


def version_off(state, tensors):
    state["learner"]["version"] = 7


def lr_text(state, tensors):
    state["learner"]["optimizer"]["param_groups"][0]["lr"] = "fast"


def tracker_text(state, tensors):
    state["driver"]["tracker"] = {"a cat": ["x"]}


def bad_config(state, tensors):
    state["config"]["seed"] = -1


def lora_shape(state, tensors):
    key = next(k for k in tensors if k.startswith("lora."))
    tensors[key] = torch.zeros(3, 3)


def optim_shape(state, tensors):
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = torch.zeros(2)


def lora_missing(state, tensors):
    del tensors[next(k for k in tensors if k.startswith("lora."))]


@pytest.mark.parametrize(
    "damage, says",
    [
        (epoch_abc, "epoch is 'abc', not a whole number"),
        (epoch_negative, "epoch is -5, not a whole number"),
        (epoch_huge, "epoch is 1000000000000000000, not an epoch within the run's 1"),
        (no_learner, "lacks learner"),
        (no_tracker, "driver lacks tracker"),
        (version_off, "learner.version is 7, not 1"),
        (lr_text, "param_groups.0.lr is 'fast', not a finite number"),
        (tracker_text, "not a finite number"),
        (bad_config, "config: seed=-1"),
        (lora_shape, "the model's is torch.float32"),
        (optim_shape, "the parameter's is"),
        (lora_missing, "learner.safetensors lacks lora."),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_before_anything_changes(
    finished_run, tmp_path, damage, says, cli_error
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    ckpt = checkpoint.latest(run_dir)
    state, tensors = json.loads((ckpt.path / checkpoint.STATE).read_text()), dict(ckpt.tensors)
    damage(state, tensors)
    tamper(ckpt.path, state, tensors)
    before = digests(run_dir)
    line = cli_error(["--resume", str(run_dir), "--epochs", "2", "--in-process"])
    assert says in line, line
    assert digests(run_dir) == before


def test_resume_refuses_changed_settings(finished_run, tmp_path, cli_error):
    """A resume takes the run's settings from its checkpoint; only run.* flags may change."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = digests(run_dir)
    argv = ["--resume", str(run_dir), "--task", "aesthetic", "--learning-rate", "1e-3"]
    assert "drop --task, --train.learning-rate" in cli_error(argv)
    other = str(tmp_path / "other")
    assert "drop --run-dir" in cli_error(["--resume", str(run_dir), "--run-dir", other])
    assert digests(run_dir) == before


def test_resume_refuses_fewer_epochs_than_done(finished_run, tmp_path, cli_error, small_config):
    from types import SimpleNamespace

    from learner.run import continued

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = digests(run_dir)
    assert "at least 1 epoch" in cli_error(["--resume", str(run_dir), "--epochs", "0"])
    assert digests(run_dir) == before
    # The finished run has done one epoch, so the flag cannot ask for fewer and yet be valid:
    # a checkpoint at epoch 5 and --epochs 2.
    with pytest.raises(ValueError, match="--epochs 2 is fewer than the 5 epochs the checkpoint"):
        continued(small_config(), SimpleNamespace(epoch=5))
