"""Alignment reward: real BERTScore numbers (packaged all-MiniLM-L6-v2) and the LLaVA plumbing on
a tiny LLaVA built from config, saved and loaded back like a real checkpoint."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.alignment import (
    JPEG_QUALITY,
    LLAVA15_PROMPT,
    QUESTION,
    AlignmentScorer,
    BertScore,
    LlavaAnswerer,
    build_tiny_llava,
    jpeg_roundtrip,
    minilm_path,
)


@pytest.fixture(scope="module")
def bertscore() -> BertScore:
    return BertScore("tiny", device="cpu")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), seed=0))


@pytest.fixture(scope="module")
def answerer(llava_dir) -> LlavaAnswerer:
    return LlavaAnswerer(llava_dir, device="cpu", batch_size=2, max_new_tokens=6)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@torch.no_grad()
def manual_bertscore(candidate: str, reference: str) -> tuple[float, float, float]:
    """BERTScore by hand (Zhang et al. 2020, no idf): cosine similarity of the last layer's token
    embeddings; every non-special token takes its best match on the other side."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()

    def embed(text: str) -> torch.Tensor:  # [T, 384] including [CLS] and [SEP]
        hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        return hidden / hidden.norm(dim=-1, keepdim=True)

    sim = embed(candidate) @ embed(reference).T  # [Tc, Tr]
    precision = sim[1:-1].max(dim=1).values.mean().item()  # candidate tokens covered
    recall = sim[:, 1:-1].max(dim=0).values.mean().item()  # reference tokens covered
    return precision, recall, 2 * precision * recall / (precision + recall)


def test_bertscore_identical_unrelated_and_direction(bertscore):
    ref = "The image contains a cat riding a bike"
    candidates = [
        ref,
        "quarterly tax filing deadlines",
        "The image contains a cat riding a bike on a busy street at night",
    ]
    p, r, f = bertscore(candidates, [ref] * 3)
    assert p.dtype == np.float32 and p.shape == (3,)
    np.testing.assert_allclose([p[0], r[0], f[0]], 1.0, atol=1e-4)  # identical texts
    assert max(p[1], r[1], f[1]) < 0.5 < min(p[2], r[2], f[2])  # unrelated clearly lower
    # The candidate covers the whole reference and more: recall (reference covered) beats
    # precision (candidate covered). Swapped arguments would flip this.
    assert r[2] > 0.9 and r[2] > p[2] + 0.1


def test_bertscore_matches_a_hand_computation(bertscore):
    pairs = [
        ("a dog playing chess in a park", "The image contains a dog playing chess"),
        ("two birds", "a red car"),
    ]
    p, r, f = bertscore([c for c, _ in pairs], [ref for _, ref in pairs])
    for i, (candidate, reference) in enumerate(pairs):
        np.testing.assert_allclose(
            [p[i], r[i], f[i]], manual_bertscore(candidate, reference), atol=1e-4
        )


def test_bertscore_scores_a_blank_answer_zero_and_the_others_as_alone(bertscore):
    """A LLaVA answer can be empty or only whitespace; bert-score crashed on it (found by the
    alignment study), taking the whole run down. Blank answers score 0 and the rest are
    unchanged."""
    ref = "The image contains a dog playing chess"
    p, r, f = bertscore(["", "   ", "a dog playing chess in a park", "\n"], [ref] * 4)
    alone = bertscore(["a dog playing chess in a park"], [ref])
    assert p.shape == (4,) and p.dtype == np.float32
    for full, single in zip((p, r, f), alone, strict=True):
        assert full[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
        np.testing.assert_allclose(full[2], single[0], atol=1e-6)


def test_jpeg_roundtrip_is_quality_80():
    image = images(1, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(image[0]).save(buffer, format="JPEG", quality=80)
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    got = np.asarray(jpeg_roundtrip(image)[0])
    assert JPEG_QUALITY == 80
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, image[0])  # lossy: LLaVA sees the compressed image


def test_llava_prompt_is_llava15_format(answerer):
    assert answerer.prompt == LLAVA15_PROMPT.format(question=QUESTION)
    assert (
        answerer.prompt
        == "USER: <image>\nAnswer concisely: what is going on in this image? ASSISTANT:"
    )


@torch.no_grad()
def test_llava_answers_equal_a_manual_greedy_decode(answerer):
    pils = jpeg_roundtrip(images(3, seed=2))
    answers = answerer(pils)  # batch_size 2: chunks of 2 + 1
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    assert answers == [answerer([p])[0] for p in pils]  # batching changes nothing
    # Greedy decoding by hand for image 0: argmax of the last position, fed back.
    inputs = answerer.processor(images=pils[:1], text=[answerer.prompt], return_tensors="pt")
    ids = inputs["input_ids"]  # [1, prompt_len]
    eos = answerer.processor.tokenizer.eos_token_id
    for _ in range(answerer.max_new_tokens):
        logits = answerer.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        ids = torch.cat([ids, token], dim=1)
        if token.item() == eos:
            break
    new = ids[0, inputs["input_ids"].shape[1] :]
    assert answers[0] == answerer.processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_alignment_reward_is_recall_of_answer_vs_prompt(llava_dir, bertscore):
    scorer = AlignmentScorer(llava_dir, "tiny", device="cpu", batch_size=4, max_new_tokens=6)
    imgs, prompts = images(2, seed=3), ["a cat riding a bike", "an owl washing the dishes"]
    rewards, info = scorer(imgs, prompts)
    assert sorted(info) == ["answer", "f1", "precision", "recall"]
    assert info["answer"] == scorer.llava(jpeg_roundtrip(imgs))
    refs = [
        "The image contains a cat riding a bike",
        "The image contains an owl washing the dishes",
    ]
    p, r, f = bertscore(info["answer"], refs)
    np.testing.assert_allclose(rewards, r, atol=1e-6)
    np.testing.assert_allclose(info["precision"], p, atol=1e-6)
    np.testing.assert_allclose(info["f1"], f, atol=1e-6)
    assert rewards.dtype == np.float32 and rewards.shape == (2,)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(imgs, prompts[:1])


def test_llava_preprocesses_with_pil_and_keeps_its_tokenizer(answerer):
    """PIL chosen for the images, as for the aesthetic reward; the tokenizer is untouched."""
    assert answerer.processor.image_processor.backend == "pil"
    assert answerer.processor.tokenizer.backend == "tokenizers"
