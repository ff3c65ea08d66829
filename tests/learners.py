"""`small_config` and `make_learner`: a learner of the tiny model at test size, in one process."""

import copy
import dataclasses

from ddpo.config import SampleConfig, StatTrackerConfig, TrainConfig
from ddpo.policy import Policy
from ddpo.presets import task_config
from learner.learner import Learner


def small_config(algorithm="ddpo_is", learning_rate=1e-3, **train):
    base = task_config("compressibility", "tiny")
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, epochs=2),
        sample=SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        train=TrainConfig(algorithm=algorithm, learning_rate=learning_rate, batch_size=4, **train),
        stat_tracker=StatTrackerConfig(buffer_size=4, min_count=2),
        grid_prompts=2,
        grid_seeds=2,
    )


def make_learner(tiny_pipe, config):
    s = config.sample
    policy = Policy(
        copy.deepcopy(tiny_pipe), s.num_steps, s.guidance_scale, s.eta, config.train.lora_rank
    )
    return Learner(config, policy=policy)
