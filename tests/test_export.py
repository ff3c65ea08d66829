"""`python -m learner.export`: the exported LoRA, loaded by plain diffusers, reproduces our sampler."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from ddpo.lora import save_lora
from ddpo.policy import Policy
from ddpo.presets import EVERY_LAYER, task_config
from learner.export import ExportError, check_run_dir, export_lora, main

SEEDS = [11, 12]


@pytest.fixture(scope="module")
def trained(tiny_pipe, tmp_path_factory):
    """A fake finished run: a Policy with random LoRA weights saved the way learner.run saves it."""
    config = task_config("compressibility", "tiny")
    s, t = config.sample, config.train
    policy = Policy(
        copy.deepcopy(tiny_pipe),
        s.num_steps,
        s.guidance_scale,
        s.eta,
        t.lora_rank,
        # Attention, feed-forward and convolutions in one file: a file that mixed diffusers'
        # old key names (the attention's) with peft's (the rest) lost the attention on loading.
        lora_targets=EVERY_LAYER,
    )
    gen = torch.Generator().manual_seed(0)
    for p in policy.trainable_parameters():
        p.data = 0.1 * torch.randn(p.shape, generator=gen)
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config), default=str))
    records = [
        {"epoch": i, "reward_mean": -3.0 + i, "reward_std": 0.1, "samples": 32} for i in range(3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_lora(policy.lora_state_dict(), run / "lora")
    prompts = list(config.prompts[:2])
    return run, policy, prompts, policy.sample(prompts, SEEDS)


def test_loaded_pipeline_reproduces_the_sampler(trained, tiny_pipe, tmp_path):
    run, policy, prompts, traj = trained
    out = tmp_path / "export"
    main([str(run), str(out)])
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == (
        run / "lora" / "pytorch_lora_weights.safetensors"
    ).read_bytes()

    pipe = copy.deepcopy(tiny_pipe)  # plain diffusers pipeline with DDIM, no adapter
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 20])
    embeds = policy.encode_prompts(prompts)
    with torch.no_grad():
        base = pipe.unet(x, t, embeds).sample
        pipe.load_lora_weights(out)
        loaded = pipe.unet(x, t, embeds).sample
        ours = policy.unet(x, t, embeds).sample
    assert (loaded - base).abs().max() > 1e-2  # the LoRA changes the model
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-5)

    # The whole sampler: diffusers' DDIM with eta=1 and per-sample generators draws the same
    # noise as Policy.sample, so the final latents and images match ours for the same seeds.
    def call(output_type):
        generators = [torch.Generator().manual_seed(s) for s in SEEDS]
        return pipe(
            prompts,
            num_inference_steps=len(traj.timesteps),
            guidance_scale=policy.guidance_scale,
            eta=1.0,
            generator=generators,
            output_type=output_type,
        ).images

    torch.testing.assert_close(call("latent"), traj.latents[:, -1], rtol=0, atol=1e-4)
    images = np.round(call("np") * 255).astype(int)
    assert np.abs(images - traj.images.astype(int)).max() <= 1


def test_model_card(trained, tmp_path):
    run, *_ = trained
    export_lora(run, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")
    assert "# DDPO LoRA: compressibility on tiny" in card
    assert "jpeg_compressibility" in card
    assert "| first reward | -3 |" in card and "| last reward | -1 |" in card
    assert "| best epoch | 2 |" in card
    config = task_config("compressibility", "tiny")  # what the fake run's config.json holds
    steps, lr = config.sample.num_steps, config.train.learning_rate
    assert f"num_inference_steps={steps}, guidance_scale=5.0, eta=1.0" in card
    assert f'"learning_rate": {lr}' in card  # the config
    assert "![reward_curve.png](reward_curve.png)" in card
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_lora(run, tmp_path)
    export_lora(run, tmp_path, overwrite=True)


def test_clear_errors_for_bad_run_dirs(trained, tmp_path, capsys):
    run, *_ = trained
    with pytest.raises(ExportError, match="does not exist; pass the directory"):
        check_run_dir(tmp_path / "nope")
    with pytest.raises(ExportError, match="has no config.json"):
        check_run_dir(tmp_path)

    bad = tmp_path / "bad"
    (bad / "lora").mkdir(parents=True)
    (bad / "config.json").write_text("{broken")
    with pytest.raises(ExportError, match="config.json is corrupt"):
        check_run_dir(bad)
    (bad / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="the run has not finished"):
        check_run_dir(bad)
    lora = bad / "lora" / "pytorch_lora_weights.safetensors"
    lora.write_bytes((run / "lora" / lora.name).read_bytes()[:200])  # truncated
    with pytest.raises(ExportError, match="is corrupt"):
        check_run_dir(bad)

    from safetensors.torch import save_file

    save_file({"text_encoder.weight": torch.zeros(2)}, str(lora))
    with pytest.raises(ExportError, match="not a diffusers UNet LoRA"):
        check_run_dir(bad)
    save_file({"unet.x.lora_A.weight": torch.tensor([1.0, float("nan")])}, str(lora))
    with pytest.raises(ExportError, match="NaN/inf"):
        check_run_dir(bad)

    (run / "metrics.jsonl").rename(run / "metrics.bak")
    try:
        (run / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n')
        with pytest.raises(ExportError, match=r"metrics.jsonl:2 is not JSON"):
            export_lora(run, tmp_path / "out")
    finally:
        (run / "metrics.bak").replace(run / "metrics.jsonl")

    with pytest.raises(SystemExit, match="error: run directory"):
        main([str(tmp_path / "nope"), str(tmp_path / "out")])
