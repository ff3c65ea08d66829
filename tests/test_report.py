"""The run report on a synthetic run directory: reward curve, index.html, TensorBoard."""

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from learner.evaluation import eval_rows
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


# ----- issue 13, finding 12: what the report hides -----
def test_grids_are_labelled_with_prompts_and_seeds(tmp_path):
    """Grids had no labels: which prompt is a row, which seed a column, was nowhere. Now the
    seeds head the columns and each prompt heads its row; the tiny model's 32 px are upscaled."""
    from ddpo.images import save_grid

    images = np.full((4, 32, 32, 3), 128, np.uint8)  # 2 prompts x 2 seeds
    prompts, seeds = ["a red circle", "a blue square on a striped background"], ["seed 1", "seed 2"]
    save_grid(images, tmp_path / "plain.png", columns=2)
    save_grid(images, tmp_path / "labelled.png", 2, row_labels=prompts, column_labels=seeds)
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("L"))
    labelled = np.asarray(Image.open(tmp_path / "labelled.png").convert("L"))
    assert plain.shape == (2 * (128 + 8) + 8, 2 * (128 + 8) + 8)  # as before: 4x, padded
    cells = np.flatnonzero((labelled == 128).sum(axis=1) >= 256)  # pixel rows of 2 images
    first_cell_row, second_cell_row = cells[0], cells[cells >= cells[0] + 128][0]
    assert labelled.shape[1] == plain.shape[1] and labelled.shape[0] > plain.shape[0]
    # Text is dark: above the first row (seed labels, then the first prompt) and between rows.
    assert (labelled[:first_cell_row] < 100).sum() > 50
    assert (labelled[first_cell_row + 128 : second_cell_row] < 100).sum() > 50
    assert (plain[:8] < 100).sum() == 0  # the unlabelled grid's margin is blank
    with pytest.raises(ValueError, match="one per row"):
        save_grid(images, tmp_path / "bad.png", 2, row_labels=["only one"])


def fake_evals(run_dir):
    start = [-1.0, -1.2, -0.8, -1.1]
    lines = [
        {"when": "start", "policy_version": 0, "reward_mean": -1.025, "rewards": start},
        {"when": 5, "policy_version": 5, "reward_mean": -0.95, "rewards": [-0.9, -1.1, -0.8, -1.0]},
        {"when": "end", "policy_version": 10, "reward_mean": -0.9, "rewards": [-0.8, -1.1, -0.7, -1.0]},
    ]  # fmt: skip
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def test_report_shows_the_evaluations_and_start_beside_end(tmp_path):
    """The report showed neither eval.jsonl (the cleanest measure of what training changed) nor
    the start and end images side by side. Now: a table of every evaluation with its paired
    gain over the start, and start_end.png."""
    from learner.evaluation import paired_gain

    fake_run(tmp_path, [1.0, 2.0])
    lines = fake_evals(tmp_path)
    page = write_report(tmp_path).read_text()
    evaluations = page[page.index("<h2>Evaluations") : page.index("<h2>Start and end")]
    assert evaluations.count("<tr>") == 1 + 3
    for column in ("when", "policy_version", "reward_mean", "gain", "gain_se", "t"):
        assert f"<th>{column}</th>" in evaluations
    end = paired_gain(lines[0]["rewards"], lines[-1]["rewards"])
    assert f"<td>{end['mean']:.4g}</td><td>{end['se']:.4g}</td><td>{end['t']:.4g}</td>" in page
    assert '<img src="start_end.png"' in page

    figure = Image.open(tmp_path / "start_end.png")
    start, end_grid = (Image.open(tmp_path / grid_name(w)) for w in ("start", "end"))
    assert figure.width >= start.width + end_grid.width
    array = np.asarray(figure.convert("RGB")).astype(int)
    top = array[figure.height - start.height :]
    # The start grid (fill 0) on the left, the end grid (fill 60) on the right, titled above.
    assert (top[:, : start.width] == 0).all() and (top[:, -end_grid.width :] == 60).all()
    assert (array[: figure.height - start.height] < 100).any()  # the titles' text


def test_readme_names_only_what_exists():
    """README.md named `rewards.serve.score_remote`, which does not exist (the client has it).
    Every `ddpo.`, `actors.`, `learner.` and `rewards.` name in the READMEs must resolve to a
    module and the function, class or constant defined in it (read from source, not imported)."""
    assert not resolves("rewards.serve.score_remote") and resolves("rewards.client.score_remote")
    for readme in (ROOT / "README.md", ROOT / "deploy" / "README.md"):
        names = python_names(readme.read_text())
        assert "learner.run" in names
        missing = sorted(n for n in names if not resolves(n))
        assert not missing, f"{readme.name} names what does not exist: {missing}"


ROOT = Path(__file__).resolve().parents[1]
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "py", "png", "txt", "pth", "html", "yaml", "md"}


def python_names(text: str) -> set[str]:
    """Dotted names of the project's packages in `text` (file names like learner.safetensors
    left out)."""
    found = set(re.findall(r"\b((?:ddpo|actors|learner|rewards)(?:\.\w+)+)", text))
    return {n for n in found if n.rsplit(".", 1)[1] not in FILE_SUFFIXES}


def resolves(dotted: str) -> bool:
    """Whether `pkg.module[.name[.attribute]]` exists: the longest prefix that is a module file,
    then names defined at its top level (def, class, assignment, import), then in that class."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        path = ROOT.joinpath(*parts[:i])
        module = (
            path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        )
        if module.is_file():
            break
    else:
        return False
    body = ast.parse(module.read_text()).body
    for name in parts[i:]:
        if name not in defined(body):
            return False
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == name), [])
    return True


def defined(body: list[ast.stmt]) -> set[str]:
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_held_out_kl_and_guard_in_the_report(tmp_path):
    """Each evaluation row pairs the training, held-out and guard rewards with the start's
    (checked against numpy), and signals.png plots them."""
    rng = np.random.default_rng(0)
    start, heldout, guard = (rng.normal(size=8) for _ in range(3))
    evals = []
    for when, shift in (("start", 0.0), (5, 0.1), ("end", 0.2)):
        evals.append(
            {
                "when": when,
                "policy_version": 0 if when == "start" else 5 if when == 5 else 10,
                "reward_mean": float((start + shift).mean()),
                "samples": 8,
                "rewards": (start + shift + rng.normal(0, 0.01, 8)).tolist(),
                "kl_base": shift / 100,
                "heldout": {"reward_mean": 0.0, "rewards": (heldout + shift / 2).tolist()},
                "guard": {"reward": "aesthetic", "rewards": (guard - shift).tolist()},
            }
        )
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (tmp_path / "config.json").write_text(json.dumps({"task": "compressibility", "epochs": 10}))
    rows = eval_rows(evals)
    for row, e in zip(rows[1:], evals[1:], strict=True):
        diff = np.subtract(e["rewards"], evals[0]["rewards"])
        assert row["gain"] == pytest.approx(diff.mean())
        assert row["gain_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(8))
        held = np.subtract(e["heldout"]["rewards"], evals[0]["heldout"]["rewards"])
        assert row["heldout_gain"] == pytest.approx(held.mean())
        fall = np.subtract(e["guard"]["rewards"], evals[0]["guard"]["rewards"])
        assert row["guard_change"] == pytest.approx(fall.mean())
        assert row["kl_base"] == e["kl_base"]
    assert "heldout_gain" not in rows[0]
    index = write_report(tmp_path).read_text()
    assert (tmp_path / "signals.png").is_file() and "signals.png" in index
    assert "heldout_gain" in index and "guard_change" in index
