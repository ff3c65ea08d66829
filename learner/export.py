"""Export a run's LoRA for plain diffusers, with a model card.

    python -m learner.export runs/aesthetic-20250101-120000 ./ddpo-aesthetic-lora

OUT_DIR gets `pytorch_lora_weights.safetensors` (the run's `lora/` file, checked and copied
byte for byte), a `README.md` model card (task, base model, reward curve summary, sampling
settings, the full config) and, when the run has them, `reward_curve.png` and the start/end
image grids. Then, in any diffusers program:

    pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # the sampler we trained
    pipe.load_lora_weights(OUT_DIR)
    pipe(prompt, num_inference_steps=50, guidance_scale=5.0, eta=1.0)
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

LORA_FILE = "pytorch_lora_weights.safetensors"  # ddpo.lora.LORA_FILE, without importing diffusers
CARD_FILE = "README.md"


class ExportError(RuntimeError):
    """A run directory cannot be exported; the message names the file and the fix."""


WEIGHTS = {"last": "lora", "best": "best"}
"""Which weights to export: the run's last (RUN_DIR/lora), or its best evaluation's (RUN_DIR/best,
see learner.guard)."""


def check_run_dir(run_dir: Path, weights: str = "last") -> tuple[dict[str, Any], Path]:
    """The run's config and the path of its LoRA file, after checking both can be read."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(
            f"run directory {run_dir} does not exist; pass the directory that "
            "`python -m learner.run` wrote (runs/<task>-<time> or its --run-dir)"
        )
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(
            f"{run_dir} has no config.json, so it is not a run directory of learner.run; "
            "pass the directory that holds config.json, metrics.jsonl and lora/"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(
            f"{config_path} is corrupt ({err}); it is written by learner.run"
        ) from err
    if not isinstance(config, dict):
        raise ExportError(f"{config_path} is not a JSON object; it is written by learner.run")
    lora = run_dir / WEIGHTS[weights] / LORA_FILE
    if weights == "best" and not lora.is_file():
        raise ExportError(
            f"{lora} does not exist: the run has evaluated nothing yet (best/ is written at each "
            "evaluation that beats the earlier ones); export --weights last, or wait"
        )
    if not lora.is_file():
        raise ExportError(
            f"{lora} does not exist: the run has not finished (learner.run writes the LoRA when "
            "its last epoch ends); wait for the run or export another one"
        )
    check_lora_file(lora)
    return config, lora


def check_lora_file(path: Path) -> int:
    """Check that `path` is a readable diffusers UNet LoRA with finite weights; its tensor count."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(
            f"{path} is corrupt ({type(err).__name__}: {err}); re-run or resume the training run"
        ) from err
    bad = [k for k in state if not (k.startswith("unet.") and "lora" in k)]
    if not state or bad:
        raise ExportError(
            f"{path} is not a diffusers UNet LoRA (keys like unet.*lora*); found "
            f"{bad[:3] or 'no tensors'}"
        )
    not_finite = [k for k, v in state.items() if not v.float().isfinite().all()]
    if not_finite:
        raise ExportError(
            f"{path} holds NaN/inf weights ({not_finite[:3]}): the run diverged; export an "
            "earlier checkpoint or retrain with a lower learning rate"
        )
    return len(state)


def export_lora(
    run_dir: Path, out_dir: Path, overwrite: bool = False, weights: str = "last"
) -> Path:
    """Write the run's LoRA (its last or its best weights), model card and plots into out_dir;
    return the LoRA path there."""
    from learner.report import grid_files, plot_reward_curve, read_metrics

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config, lora = check_run_dir(run_dir, weights)
    metrics_path = run_dir / "metrics.jsonl"
    try:
        records = read_metrics(metrics_path) if metrics_path.is_file() else []
    except ValueError as err:
        raise ExportError(f"{err}; fix or delete that line and export again") from err
    target = out_dir / LORA_FILE
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass --overwrite or choose another OUT_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lora, target)
    images = []
    if records:
        plot_reward_curve(records, out_dir / "reward_curve.png", title=_title(config))
        images.append("reward_curve.png")
    for grid in grid_files(run_dir):
        if grid.name in ("grid_start.png", "grid_end.png"):
            shutil.copyfile(grid, out_dir / grid.name)
            images.append(grid.name)
    card = model_card(config, records, images, out_dir.name, evaluation_lines(run_dir, weights))
    (out_dir / CARD_FILE).write_text(card)
    return target


def evaluation_lines(run_dir: Path, weights: str) -> list[str]:
    """The model card's evaluation section: the paired gains of the exported weights over the
    start, on the training prompts and on held-out prompts never trained on."""
    from learner.evaluation import paired_gain, read_evals

    try:
        evals = read_evals(run_dir)
    except (OSError, ValueError):
        return []
    if weights == "best":
        try:
            best = json.loads((run_dir / "best" / "evaluation.json").read_text())
        except (OSError, ValueError):
            return []
        end = next((e for e in evals if e.get("when") == best.get("when")), None)
    else:
        end = evals[-1] if evals and evals[-1].get("when") == "end" else None
    if end is None or len(evals) < 2 or "rewards" not in evals[0]:
        return []
    lines = [
        "## Evaluation",
        "",
        f"Exported: the {weights} weights (evaluation at {end['when']}, policy version "
        f"{end.get('policy_version', '?')}). Paired gain over the start: the same fixed prompts "
        "and seeds scored under both weights.",
        "",
        "| prompts | samples | start | exported | paired gain (t) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, start, now in (
        ("training", evals[0], end),
        ("held-out, never trained on", evals[0].get("heldout"), end.get("heldout")),
    ):
        if start and now:
            gain = paired_gain(start["rewards"], now["rewards"])
            lines.append(
                f"| {label} | {len(now['rewards'])} | {start['reward_mean']:.4g} | "
                f"{now['reward_mean']:.4g} | {gain['mean']:+.4g} ({gain['t']:+.1f}) |"
            )
    if "kl_base" in end:
        lines += ["", f"KL to the base model (per step, on these samples): {end['kl_base']:.3g}."]
    return lines + [""]


def _title(config: dict[str, Any]) -> str:
    return f"{config.get('task', 'ddpo')} on {config.get('model', '?')}"


def model_card(
    config: dict[str, Any],
    records: list[dict[str, Any]],
    images: list[str],
    name: str,
    evaluation: Sequence[str] = (),
) -> str:
    """A Hugging Face style model card (YAML front matter + markdown)."""
    from learner.report import reward_summary

    model = str(config.get("model", "?"))
    task, reward = config.get("task", "?"), config.get("reward", "?")
    sample, train = config.get("sample", {}), config.get("train", {})
    steps = sample.get("num_steps", 50)
    guidance, eta = sample.get("guidance_scale", 5.0), sample.get("eta", 1.0)
    front = ["---", "library_name: diffusers"]
    if model != "tiny":
        front.append(f"base_model: {model}")
    front += ["tags: [stable-diffusion, lora, ddpo, reinforcement-learning, text-to-image]", "---"]
    if model == "tiny":
        load = 'from ddpo.policy import load_pipeline\npipe = load_pipeline("tiny")  # ddpo-ray\'s embedded tiny model'
    else:
        load = (
            "from diffusers import DDIMScheduler, StableDiffusionPipeline\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{model}")\n'
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    prompts = config.get("prompts") or ["a photo of a cat"]
    summary = reward_summary(records)
    lines = [
        *front,
        f"# DDPO LoRA: {task} on {model}",
        "",
        f"A LoRA (rank {train.get('lora_rank', '?')}, on the UNet's attention projections) trained "
        f"with {train.get('algorithm', 'ddpo_is')} (DDPO, Black et al. 2023, arXiv 2305.13301) "
        f"by ddpo-ray, to maximise the reward `{reward}`.",
        "",
        "## Use",
        "",
        "```python",
        load,
        f'pipe.load_lora_weights("{name}")  # this directory',
        f"image = pipe({json.dumps(prompts[0])}, num_inference_steps={steps}, "
        f"guidance_scale={guidance}, eta={eta}).images[0]",
        "```",
        "",
        f"Trained with DDIM, {steps} steps, eta {eta}, guidance {guidance}: sample the same way.",
        "",
        "## Reward",
        "",
    ]
    if records:
        lines += ["| | |", "| --- | --- |"]
        lines += [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in summary.items()]
    else:
        lines.append("The run logged no epochs.")
    lines += [""] + [f"![{image}]({image})" for image in images] + [""]
    lines += list(evaluation)
    lines += [
        "## Training config",
        "",
        "```json",
        json.dumps(_without_prompts(config), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _without_prompts(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the prompt list shortened (the paper's sets have hundreds)."""
    prompts = config.get("prompts")
    if isinstance(prompts, list) and len(prompts) > 5:
        return {**config, "prompts": [*prompts[:5], f"... {len(prompts) - 5} more"]}
    return config


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def cli(
    run_dir: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")],
    out_dir: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="OUT_DIR")],
    overwrite: bool = False,
    weights: Literal["last", "best"] = "last",
) -> None:
    """Export a run's LoRA (for `StableDiffusionPipeline.load_lora_weights`) with a model card.

    Args:
        run_dir: The run directory (config.json, metrics.jsonl, lora/).
        out_dir: Where to write the LoRA, README.md and plots.
        overwrite: Replace a LoRA already in OUT_DIR.
        weights: The run's last weights, or those of its best evaluation (RUN_DIR/best).
    """
    try:
        path = export_lora(run_dir, out_dir, overwrite, weights)
    except ExportError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path} and {Path(out_dir) / CARD_FILE}")


def main(argv: list[str] | None = None) -> None:
    tyro.cli(cli, args=argv, prog="python -m learner.export")


if __name__ == "__main__":
    main()
