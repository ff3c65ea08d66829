"""Checkpoints: atomic writes, checksums, fallback to the previous one, exact resume."""

import errno
import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from learner import checkpoint


def write(run_dir, epoch, value=1.0, keep=5):
    tensors = {"lora.w": torch.full((3,), value), "rng.generator": torch.Generator().get_state()}
    state = {"learner": {"version": epoch}, "driver": {}, "config": {}}
    return checkpoint.save(run_dir, epoch, tensors, state, [{"epoch": epoch}], keep=keep)


def test_round_trip_and_manifest(tmp_path):
    path = write(tmp_path, 3, value=2.5)
    assert path.name == "epoch-000003"
    ckpt = checkpoint.load(path)
    assert ckpt.epoch == 3 and ckpt.metrics == [{"epoch": 3}]
    assert torch.equal(ckpt.tensors["lora.w"], torch.full((3,), 2.5))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert set(manifest["files"]) == {checkpoint.TENSORS, checkpoint.STATE, checkpoint.METRICS}
    # Nothing pickled: every file is safetensors or JSON.
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [checkpoint.TENSORS, checkpoint.STATE, checkpoint.METRICS, checkpoint.MANIFEST]
    )
    load_file(path / checkpoint.TENSORS)
    json.loads((path / checkpoint.STATE).read_text())


def test_keeps_the_newest(tmp_path):
    for epoch in range(5):
        write(tmp_path, epoch, keep=2)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert names == ["epoch-000003", "epoch-000004"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "missing_file"])
def test_a_damaged_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    write(tmp_path, 1, value=1.0)
    newest = write(tmp_path, 2, value=2.0)
    target = newest / checkpoint.TENSORS
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "no_manifest":  # a write that stopped before its last file
        (newest / checkpoint.MANIFEST).unlink()
    else:
        (newest / checkpoint.METRICS).unlink()
    assert checkpoint.verify(newest) is not None
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoint.latest(tmp_path)
    assert ckpt is not None and ckpt.epoch == 1
    assert torch.equal(ckpt.tensors["lora.w"], torch.ones(3))
    assert "epoch-000002" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="unusable"):
        checkpoint.load(newest)


def test_disk_full_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    write(tmp_path, 1, value=1.0)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        write(tmp_path, 2, value=2.0, keep=1)
    # Nothing half-written is left, and keep=1 did not delete the good one.
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == ["epoch-000001"]
    assert checkpoint.latest(tmp_path).epoch == 1


def test_optimizer_state_round_trip():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = checkpoint.optimizer_state(opt)
    tensors = {k: v.clone() for k, v in tensors.items()}  # as stored: not opt's live tensors
    meta = json.loads(json.dumps(meta))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = torch.optim.AdamW(twin, lr=1.0)  # the checkpoint's lr wins
    checkpoint.load_optimizer_state(opt2, tensors, meta)
    for o, ps in ((opt, params), (opt2, twin)):  # one more identical step on both
        sum((p**2).sum() for p in ps).backward()
        o.step()
    for a, b in zip(params, twin, strict=True):
        assert torch.equal(a, b)


def run_main(argv):
    from learner.run import main

    main([*argv, "--in-process"])


def records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)  # everything but wall-clock times and busy fractions
        out.append({k: v for k, v in record.items() if "seconds" not in k and "busy" not in k})
    return out


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(small_config, tmp_path, monkeypatch):
    """Sync, in one process: 4 epochs straight, and 2 epochs then --resume to 4, give the same
    metrics (every float) and the same LoRA file, byte for byte."""
    from ddpo.config import Config, override

    config = small_config(run={"epochs": 4, "save_every": 2})
    straight = tmp_path / "straight"
    stopped = tmp_path / "stopped"
    for run_dir, epochs in ((straight, 4), (stopped, 2)):
        from learner.driver import train
        from learner.wiring import InProcess

        train(override(config, {"run.dir": run_dir, "run.epochs": epochs}), InProcess())
    assert checkpoint.latest(stopped).epoch == 2
    saved = Config.from_dict(json.loads((stopped / "config.json").read_text()))
    assert override(saved, {"run.epochs": 4, "run.dir": straight}) == override(
        config, {"run.dir": straight}
    )
    run_main(["--resume", str(stopped), "--epochs", "4"])

    assert records(stopped) == records(straight)
    lora = "lora/pytorch_lora_weights.safetensors"
    assert (stopped / lora).read_bytes() == (straight / lora).read_bytes()
    # The logs hold every epoch once: the resumed run cut what came after its checkpoint.
    epochs = [json.loads(s)["epoch"] for s in (stopped / "samples.jsonl").open()]
    assert epochs == [json.loads(s)["epoch"] for s in (straight / "samples.jsonl").open()]
    evals = [json.loads(s) for s in (stopped / "eval.jsonl").open()]
    assert [e["when"] for e in evals] == ["start", "end"]
    assert evals == [json.loads(s) for s in (straight / "eval.jsonl").open()]


def test_resume_refuses_empty_runs(tmp_path, cli_error):
    """(Changed settings: test_cli_errors.py, on a finished run.)"""
    assert "no intact checkpoint" in cli_error(["--resume", str(tmp_path)])
    assert "no such directory" in cli_error(["--resume", str(tmp_path / "nope")])


def test_a_full_disk_at_one_checkpoint_keeps_the_run_and_the_older_checkpoints(
    small_config, monkeypatch, caplog
):
    from learner.driver import train
    from learner.wiring import InProcess

    real, saves = checkpoint.save_file, []

    def disk_full_at_the_third_save(tensors, path):
        saves.append(path)
        if len(saves) == 3:  # checkpoints 0 and 1 are written, 2 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_at_the_third_save)
    config = small_config(run={"epochs": 3, "save_every": 1, "keep_checkpoints": 5})
    with caplog.at_level(logging.ERROR):
        history = train(config, InProcess())
    assert len(history) == 3
    assert "checkpoint 2 not written" in caplog.text and "No space" in caplog.text
    root = checkpoint.checkpoint_dir(config.run.dir)
    assert sorted(p.name for p in root.iterdir()) == [
        "epoch-000000",
        "epoch-000001",
        "epoch-000003",
    ]
    assert all(checkpoint.verify(p) is None for p in root.iterdir())


@pytest.fixture(scope="module")
def one_epoch_run(small_config_in, tmp_path_factory):
    """A run of one checkpointed epoch, for tests to copy and tamper with."""
    from learner.driver import train
    from learner.wiring import InProcess

    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    train(small_config_in(run_dir, run={"epochs": 1, "save_every": 1}), InProcess())
    return run_dir


@pytest.mark.parametrize(
    "logs",
    [{"../victim.txt": 0}, {"VICTIM": 0}, {"eval.jsonl": 10**9}, {"eval.jsonl": -1}, [1]],
    ids=["relative-escape", "absolute", "too-large", "negative", "not-a-mapping"],
)
def test_resume_refuses_a_checkpoint_that_names_other_files(
    one_epoch_run, tmp_path, logs, cli_error
):
    """A tampered state.json (its manifest rewritten to match, as an attacker would) that names
    a file outside the run, or a size the log does not have: one-line refusal, nothing touched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, run_dir)
    ckpt = checkpoint.latest(run_dir).path
    state = json.loads((ckpt / "state.json").read_text())
    if isinstance(logs, dict):  # "VICTIM" stands for the victim's absolute path
        logs = {str(victim) if name == "VICTIM" else name: size for name, size in logs.items()}
    state["driver"]["logs"] = logs
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = checkpoint._digest(ckpt / "state.json")
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    evals_before = (run_dir / "eval.jsonl").read_bytes()

    line = cli_error(["--resume", str(run_dir), "--in-process"])
    assert re.search("damaged or was tampered with|not a mapping|not a JSON object", line), line
    assert victim.read_text() == "precious\n"
    assert (run_dir / "eval.jsonl").read_bytes() == evals_before
