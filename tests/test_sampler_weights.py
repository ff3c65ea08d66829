"""Which queued weights a sampler loads before its next batch.

Found by running the suite on a loaded machine: an async run with --auto-resume lost its
learner while the sampler still held the newest version queued (v3); the learner restored from
the checkpoint of v2 published v2, the sampler kept v3 as the newer, and its next batch claimed
a version the learner did not have yet ("a batch claims a policy version newer than 2").
"""

import numpy as np
import pytest
import torch

from actors.sampler import Sampler


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    from ddpo.config import SampleConfig, TrainConfig, override
    from ddpo.presets import task_config

    config = override(
        task_config("compressibility", "tiny"),
        {
            "run.dir": tmp_path_factory.mktemp("run"),
            "sample": SampleConfig(num_steps=2, batch_size=2, num_batches_per_epoch=1),
            "train": TrainConfig(batch_size=2),
        },
    )
    return Sampler(config, sampler_id=0)


def weights(sampler, value):
    """The sampler's LoRA state dict with every tensor filled with `value`."""
    return {k: torch.full_like(v, value) for k, v in sampler.policy.lora_state_dict().items()}


def next_batch_version(sampler):
    """Sample one batch; its claimed version and the LoRA value the sampler holds then."""
    _, _, meta = sampler.sample(["a red circle"] * 2, np.arange(2))
    held = {float(v.flatten()[0]) for v in sampler.policy.lora_state_dict().values()}
    assert len(held) == 1, held
    return meta["policy_version"], held.pop()


def test_an_older_version_arriving_late_does_not_replace_the_newer(sampler):
    sampler.set_weights(3, weights(sampler, 0.03))
    sampler.set_weights(2, weights(sampler, 0.02))  # out of order, same learner
    assert next_batch_version(sampler) == (3, pytest.approx(0.03))


def test_a_replaced_learner_s_older_version_replaces_the_queued_newer(sampler):
    sampler.set_weights(3, weights(sampler, 0.03))  # queued, not yet loaded, when v3's learner dies
    sampler.set_weights(2, weights(sampler, 0.02), generation=1)  # restored from checkpoint v2
    sampler.set_weights(3, weights(sampler, 0.03))  # a late message of the lost learner
    assert next_batch_version(sampler) == (2, pytest.approx(0.02))
    # The restored learner's next version is loaded as usual.
    sampler.set_weights(3, weights(sampler, 0.031), generation=1)
    assert next_batch_version(sampler) == (3, pytest.approx(0.031))
