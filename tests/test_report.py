"""The run report on a synthetic run directory: reward curve, index.html, TensorBoard."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from learner.report import (
    TensorBoardWriter,
    grid_files,
    grid_name,
    read_metrics,
    reward_summary,
    write_report,
)

C0 = np.array([31, 119, 180])  # matplotlib's first line colour, the reward curve


def fake_run(run_dir, rewards, grids=("start", 10, 5, "end")):
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "epoch": i,
            "policy_version": i,
            "reward_mean": r,
            "reward_std": 0.1,
            "loss": None if i == 0 else 0.01 * i,
            "samples": 32,
            "seconds": 2.0,
            "reward/aesthetic/mean": 2 * r,
            "reward/alignment/mean": -r,
        }
        for i, r in enumerate(rewards)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.json").write_text(
        json.dumps({"task": "aesthetic <b>", "model": "tiny", "seed": 0})
    )
    for i, g in enumerate(grids):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(run_dir / grid_name(g))
    return records


def line_pixels(png):
    """(x, y) of the pixels drawn in the reward line's colour."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    ys, xs = np.nonzero(np.abs(image - C0).sum(axis=-1) < 30)
    return xs, ys


def test_report_on_a_synthetic_run(tmp_path):
    rewards = list(np.linspace(-5.0, -1.0, 12))
    records = fake_run(tmp_path, rewards)
    index = write_report(tmp_path)

    assert [p.name for p in grid_files(tmp_path)] == [
        "grid_start.png",
        "grid_epoch0005.png",
        "grid_epoch0010.png",
        "grid_end.png",
    ]
    page = index.read_text()
    assert index == tmp_path / "index.html"
    assert '<img src="reward_curve.png"' in page
    positions = [page.index(f'src="{p.name}"') for p in grid_files(tmp_path)]
    assert positions == sorted(positions)  # grids in training order
    assert page.count("<tr>") == 1 + len(records)  # header + one row per epoch
    assert "aesthetic &lt;b&gt;" in page and "aesthetic <b>" not in page  # escaped
    assert f"{rewards[-1]:.4g}" in page
    assert "best_reward -1" in page

    # The curve is drawn and rises: the line's pixels sit lower (larger y) on the left.
    xs, ys = line_pixels(tmp_path / "reward_curve.png")
    assert len(xs) > 100
    left, right = ys[xs < np.percentile(xs, 20)], ys[xs > np.percentile(xs, 80)]
    assert left.mean() > right.mean() + 50

    # A falling run draws the opposite slope.
    falling = tmp_path / "falling"
    fake_run(falling, rewards[::-1], grids=())
    write_report(falling)
    xs, ys = line_pixels(falling / "reward_curve.png")
    assert ys[xs < np.percentile(xs, 20)].mean() + 50 < ys[xs > np.percentile(xs, 80)].mean()


def test_summary_and_bad_metrics(tmp_path):
    records = fake_run(tmp_path, [1.0, 3.0, 2.0])
    assert reward_summary(records) == {
        "epochs": 3,
        "first_reward": 1.0,
        "last_reward": 2.0,
        "best_reward": 3.0,
        "best_epoch": 1,
        "samples": 96,
        "seconds": 6.0,
    }
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:4 is not JSON"):
        read_metrics(tmp_path / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_run_without_epochs_still_gets_a_page(tmp_path):
    fake_run(tmp_path, [], grids=("start",))
    page = write_report(tmp_path).read_text()
    assert "grid_start.png" in page and "reward_curve.png" not in page
    assert not (tmp_path / "reward_curve.png").exists()


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = fake_run(tmp_path, [1.0, 2.0])
    writer = TensorBoardWriter(tmp_path / "tb")
    for r in records:
        writer.scalars(r, step=r["epoch"])
    writer.image("grid/end", tmp_path / "grid_end.png", step=1)
    writer.close()

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(0, 1.0), (1, 2.0)]
    assert [e.value for e in events.Scalars("reward/aesthetic/mean")] == [2.0, 4.0]
    assert [e.step for e in events.Scalars("loss")] == [1]  # None at epoch 0 is skipped
    (image,) = events.Images("grid/end")
    assert (image.step, image.width, image.height) == (1, 8, 8)


def test_tensorboard_missing_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardWriter(tmp_path / "tb")


def test_cli(tmp_path, capsys):
    from learner.report import main

    fake_run(tmp_path, [1.0, 2.0])
    main([str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "index.html")
    with pytest.raises(SystemExit, match="usage"):
        main([])
    with pytest.raises(SystemExit, match="error: run directory .* does not exist"):
        main([str(tmp_path / "missing")])
