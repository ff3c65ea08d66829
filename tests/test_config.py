"""Task presets, prompt files and configuration errors."""

import dataclasses

import pytest

from ddpo.config import Config, SampleConfig, TrainConfig, override
from ddpo.presets import animal_activities, imagenet_animals, simple_animals, task_config
from ddpo.prompt_text import read_prompt_file
from learner.run import fresh, main, parse


def test_paper_presets():
    comp = task_config("compressibility", "CompVis/stable-diffusion-v1-4")
    # The reference's global sizes (8 GPUs): 256 samples an epoch, optimizer steps of 64.
    assert comp.samples_per_epoch == 256 and comp.sample.batch_size == 8
    assert comp.train.batch_size * comp.train.gradient_accumulation_steps == 64
    assert (
        comp.sample.num_steps == 50 and comp.sample.guidance_scale == 5.0 and comp.sample.eta == 1.0
    )
    assert (
        comp.train.clip_range == 1e-4
        and comp.train.adv_clip_max == 5
        and comp.train.learning_rate == 3e-4
    )
    assert len(comp.prompts) == 398 and comp.prompts[0].startswith("tench")
    aes = task_config("aesthetic", "some/model")
    assert (
        aes.model == "some/model" and aes.stat_tracker.buffer_size == 32 and aes.run.epochs == 200
    )
    assert len(simple_animals()) == 45
    align = task_config("alignment", "x/y")
    assert align.samples_per_epoch == 384 and align.prompts == animal_activities()
    assert align.train.batch_size * align.train.gradient_accumulation_steps == 192
    assert len(animal_activities()) == 135
    assert (
        "an ant riding a bike" in animal_activities()
        or "an elephant playing chess" in animal_activities()
    )
    assert len(imagenet_animals()) == 398


def test_tiny_presets_use_the_tiny_world():
    from ddpo.tiny import world

    for task in ("compressibility", "incompressibility"):
        config = task_config(task, "tiny")
        assert set(config.prompts) <= set(world.short_prompts()) and len(config.prompts) == 6
        assert config.sample.num_steps < 50


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of compressibility"):
        task_config("nope")


def test_prompt_files(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("# animals\na cat\n\n  a dog  \n")
    assert read_prompt_file(good) == ("a cat", "a dog")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompt_file(binary)
    with pytest.raises(ValueError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    config = fresh(parse(["--prompts", str(good), "--run-dir", str(tmp_path / "run")]))
    assert config.prompts == ("a cat", "a dog")


def test_batch_sizes_must_divide():
    base = task_config("compressibility")
    with pytest.raises(ValueError, match="do not divide into optimizer steps"):
        dataclasses.replace(base, sample=SampleConfig(batch_size=5, num_batches_per_epoch=1))
    override(base, {"system.num_samplers": 3, "sample": SampleConfig(32, num_batches_per_epoch=4)})
    with pytest.raises(ValueError, match="num_samplers=3 exceeds sample.num_batches_per_epoch=2"):
        override(base, {"system.num_samplers": 3})
    with pytest.raises(ValueError, match="eta"):
        SampleConfig(eta=0.0)
    with pytest.raises(ValueError, match="timestep_fraction"):
        TrainConfig(timestep_fraction=0.0)
    with pytest.raises(ValueError, match="prompt set is empty"):
        Config(prompts=())


def test_cli_help_lists_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for task in ("compressibility", "incompressibility", "aesthetic", "alignment"):
        assert task in out
    for flag in (
        "--task",
        "--model",
        "--epochs",
        "--run-dir",
        "--seed",
        "--address",
        "--num-samplers",
        "--prompts",
    ):
        assert flag in out


def test_cli_rejects_unknown_task(capsys):
    with pytest.raises(SystemExit):
        main(["--task", "nope"])
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["compressibility", "incompressibility", "aesthetic", "alignment"])
@pytest.mark.parametrize("model", ["tiny", "CompVis/stable-diffusion-v1-4"])
def test_heldout_prompts_are_never_trained_on(task, model):
    """Every preset has held-out prompts, disjoint from its training prompts, and no epoch's
    schedule ever draws one."""
    from learner.driver import epoch_schedule, grid_schedule

    config = task_config(task, model)
    heldout = set(config.heldout_prompts)
    assert len(heldout) >= 6 and not heldout & set(config.prompts)
    drawn = {p for epoch in range(50) for p in epoch_schedule(config, epoch)[0]}
    assert drawn <= set(config.prompts) and not drawn & heldout
    prompts, _ = grid_schedule(config, heldout=True)
    assert set(prompts) <= heldout and len(prompts) == config.grid_prompts * config.grid_seeds
    if model == "tiny":  # colour-shape pairs unseen in training
        from ddpo.tiny import world

        assert heldout <= set(world.short_prompts())
        assert len(heldout) == 6 and not heldout & set(config.prompts)


def test_heldout_prompts_must_not_be_trained_on(tmp_path):
    config = task_config("compressibility", "tiny")
    with pytest.raises(ValueError, match="held-out prompts are also training prompts"):
        dataclasses.replace(config, heldout_prompts=config.prompts[:1])
    # --prompts drops the preset's held-out set (chosen against its own prompts);
    # --heldout-prompts gives one.
    mine = tmp_path / "mine.txt"
    mine.write_text("a red circle on a plain background\n")
    other = tmp_path / "other.txt"
    other.write_text("a blue circle on a plain background\n")
    assert fresh(parse(["--prompts", str(mine)])).heldout_prompts == ()
    built = fresh(parse(["--prompts", str(mine), "--heldout-prompts", str(other)]))
    assert built.heldout_prompts == ("a blue circle on a plain background",)


def test_print_config_shows_the_global_sizes_and_starts_nothing(tmp_path, capsys, monkeypatch):
    """Issue 15: 8 samplers on the paper's compressibility preset sample the reference's 256 an
    epoch (4 calls of 8 each); nothing is written and Ray is not imported."""
    import json
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # importing ray would fail
    model = "CompVis/stable-diffusion-v1-4"
    main(["--task", "compressibility", "--model", model, "--num-samplers", "8", "--print-config"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["derived"]["samples_per_epoch"] == 256
    assert shown["derived"]["samples_per_optimizer_step"] == 64
    assert shown["derived"]["sampler_calls_per_sampler"] == [4] * 8
    assert shown["system"]["num_samplers"] == 8 and shown["model"] == model
    main(["--task", "compressibility", "--model", model, "--num-samplers", "3", "--print-config"])
    uneven = json.loads(capsys.readouterr().out)["derived"]["sampler_calls_per_sampler"]
    assert uneven == [11, 11, 10]
    main(["--task", "compressibility", "--model", model, "--num-learners", "4", "--print-config"])
    shown = json.loads(capsys.readouterr().out)
    assert (
        shown["system"]["num_learners"] == 4
        and shown["derived"]["samples_per_learner_minibatch"] == 1
    )
    assert list(tmp_path.iterdir()) == []


def test_every_config_field_is_a_flag_over_the_preset(tmp_path, capsys):
    """Issue 14: nested flags (`--train.clip-range`), the preset's values as the defaults, the
    old short flags as aliases, and the result in config.json's layout."""
    import json

    argv = ["--task", "aesthetic", "--train.clip-range", "1e-3", "--sample.num-steps", "7"]
    argv += ["--epochs", "3", "--num-samplers", "2", "--system.mode", "async"]
    config = parse(argv).config
    preset = task_config("aesthetic", "tiny")
    assert config.train.clip_range == 1e-3 and config.sample.num_steps == 7
    assert config.run.epochs == 3 and config.system.num_samplers == 2
    assert config.system.mode == "async" and config.reward == "aesthetic"
    assert config.train.learning_rate == preset.train.learning_rate  # not given: the preset's
    main([*argv, "--run-dir", str(tmp_path / "run"), "--print-config"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["clip_range"] == 1e-3 and shown["sample"]["num_steps"] == 7
    assert Config.from_dict({k: v for k, v in shown.items() if k != "derived"}) == fresh(
        parse([*argv, "--run-dir", str(tmp_path / "run")])
    )
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "usage: python -m learner.run" in capsys.readouterr().out


def test_a_config_json_of_the_flat_layout_is_read():
    """Runs written before the run/system groups keep their config.json (resume, export)."""
    config = task_config("compressibility", "tiny")
    flat = dataclasses.asdict(config)
    run, system = flat.pop("run"), flat.pop("system")
    system.pop("num_learners"), system.pop("learner_placement")  # came later
    flat |= {"run_dir": run.pop("dir")} | run | system
    assert Config.from_dict(flat) == config
    with pytest.raises(ValueError, match=r"fields this version does not know: \['nope'\]"):
        Config.from_dict(flat | {"nope": 1})


def test_override_and_what_a_resume_may_change():
    from ddpo.config import resumable_changes

    config = task_config("compressibility", "tiny")
    changed = override(config, {"run.epochs": 90, "run": {"save_every": 1}, "seed": 3})
    assert (changed.run.epochs, changed.run.save_every, changed.seed) == (90, 1, 3)
    assert resumable_changes(config, changed) == ["seed"]  # run.* may change on a resume
    assert resumable_changes(config, override(config, {"train.clip_range": 0.1})) == [
        "train.clip_range"
    ]
    with pytest.raises(ValueError, match="RunConfig has no field 'epoch'; choose one of dir"):
        override(config, {"run.epoch": 3})
    with pytest.raises(ValueError, match="Config has no field 'mode'; it is system.mode"):
        override(config, {"mode": "async"})  # the flat layout's name: where it went
    with pytest.raises(ValueError, match=r"system.num_learners=0 must be at least 1"):
        override(config, {"system.num_learners": 0})


def test_presets_derive_with_one_tiny_scaler():
    from ddpo.presets import TASKS, TINY_TASK_SETTINGS, tiny

    assert set(TINY_TASK_SETTINGS) <= set(TASKS)
    for task, preset in TASKS.items():
        assert task_config(task, "tiny") == tiny(preset())
        small = task_config(task, "tiny")
        own = TINY_TASK_SETTINGS.get(task, {})
        assert small.model == "tiny" and small.sample.num_steps == 10
        assert small.run.epochs == own.get("run.epochs", 30)
        assert small.reward == preset().reward
        for path, value in own.items():  # each task's own settings land where they name
            section, name = path.split(".")
            assert getattr(getattr(small, section), name) == value, (task, path)


def test_learner_counts_that_do_not_divide_the_minibatch_stop_in_one_line(cli_error, tmp_path):
    line = cli_error(["--num-learners", "3"])
    assert "num_learners=3" in line and "use a number of learners that divides it" in line
    line = cli_error(["--num-learners", "0"])
    assert "num_learners=0 must be at least 1" in line
    line = cli_error(["--num-learners", "2", "--in-process", "--run-dir", str(tmp_path / "r")])
    assert "drop --in-process" in line and not (tmp_path / "r").exists()
