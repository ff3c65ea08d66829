import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores: one intra-op thread per process keeps Ray workers and pytest from oversubscribing.
torch.set_num_threads(int(os.environ.get("DDPO_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_pipe():
    from ddpo.policy import load_pipeline

    return load_pipeline("tiny")
