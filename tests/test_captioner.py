"""The tiny captioner: its training labels cover exactly the answer, and the shipped one reads
the tiny world well enough that the alignment reward tells a right prompt from a wrong one."""

import numpy as np
import pytest

from ddpo.tiny import world
from rewards.alignment import TINY_LLAVA, AlignmentScorer, LlavaAnswerer, build_tiny_llava
from rewards.captioner import TINY_DIFFUSION, BlurredWorld, answer_for, training_batch


@pytest.fixture(scope="module")
def blurred() -> BlurredWorld:
    return BlurredWorld(TINY_DIFFUSION, np.random.default_rng(123))


def test_training_labels_are_the_answer_and_eos_only(tmp_path, blurred):
    answerer = LlavaAnswerer(str(build_tiny_llava(tmp_path, width=32, patch_size=4)), device="cpu")
    images, _ = blurred.batch(3)
    answers = ["a red circle", "a blue square on a noisy background", "a white triangle"]
    batch = training_batch(answerer, images, answers)
    tokenizer = answerer.processor.tokenizer
    assert tokenizer.padding_side == "left"  # rows of different length: pads come first
    for row, answer in enumerate(answers):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert tokenizer.decode(labelled) == f" {answer}{tokenizer.eos_token}"
        # The labels are the input ids where they are set: the model shifts them itself.
        ids = batch["input_ids"][row][batch["labels"][row] != -100]
        assert ids.tolist() == labelled.tolist()
    # The image tokens (4x4 px patches of a 32x32 image: 64) never carry loss.
    image_id = answerer.model.config.image_token_id
    assert int((batch["input_ids"] == image_id).sum(dim=1)[0]) == 64
    assert not (batch["labels"] == image_id).any()


def test_answer_is_colour_and_shape():
    assert answer_for("a red circle on a striped background") == "a red circle"


def test_shipped_captioner_names_colour_and_shape(blurred):
    answerer = LlavaAnswerer("tiny", device="cpu", batch_size=32, max_new_tokens=12)
    assert answerer.model.name_or_path == str(TINY_LLAVA)
    images, prompts = blurred.batch(48)
    answers = answerer(images)
    said = [a.split() for a in answers]
    colour = np.mean([s[1:2] == p.split()[1:2] for s, p in zip(said, prompts, strict=True)])
    shape = np.mean([s[2:3] == p.split()[2:3] for s, p in zip(said, prompts, strict=True)])
    assert [len(a.split()) for a in answers] == [3] * len(answers), answers  # "a red circle"
    assert colour >= 0.9, (colour, list(zip(prompts, answers, strict=True)))
    assert shape >= 0.5, (shape, list(zip(prompts, answers, strict=True)))  # chance is 1/3


def test_alignment_reward_prefers_the_drawn_prompt(blurred):
    """The same images score higher against their own prompts than against another colour's."""
    images, prompts = blurred.batch(24)
    colours = list(world.COLOURS)
    wrong = [
        p.replace(p.split()[1], colours[(colours.index(p.split()[1]) + 1) % len(colours)], 1)
        for p in prompts
    ]
    pixels = np.stack([np.asarray(image) for image in images])
    scorer = AlignmentScorer("tiny", "tiny", device="cpu", batch_size=24, max_new_tokens=12)
    right, _ = scorer(pixels, prompts)
    other, _ = scorer(pixels, wrong)
    assert (right > other).mean() >= 0.9, (right, other)
    assert right.mean() - other.mean() > 0.05
