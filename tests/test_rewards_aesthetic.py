"""LAION aesthetic reward: the real MLP weights against numpy, on a tiny CLIP built from config."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.aesthetic import AestheticMLP, AestheticScorer, build_tiny_clip, load_aesthetic_mlp

ASSET = "sac+logos+ava1-l14-linearMSE.pth"
CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "assets",
    Path("/work/shared/assets"),
]
MLP_PATH = next((d / ASSET for d in CANDIDATES if (d / ASSET).is_file()), None)
needs_weights = pytest.mark.skipif(MLP_PATH is None, reason=f"{ASSET} not in shared/assets")

# CLIP's image normalization (openai/clip-vit-large-patch14 preprocessor_config.json).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def numpy_mlp(state: dict, x: np.ndarray) -> np.ndarray:
    """The predictor by hand in float64: five affine layers, no activation, no dropout at eval."""
    for i in (0, 2, 4, 6, 7):
        w = state[f"layers.{i}.weight"].double().numpy()
        b = state[f"layers.{i}.bias"].double().numpy()
        x = x @ w.T + b
    return x[:, 0]


@pytest.fixture(scope="module")
def state() -> dict:
    return torch.load(MLP_PATH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> AestheticScorer:
    clip_dir = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)
    return AestheticScorer(str(clip_dir), MLP_PATH, device="cpu", batch_size=2)


@needs_weights
def test_mlp_matches_numpy_on_fixed_embeddings(state):
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((5, 768))
    embed /= np.linalg.norm(embed, axis=1, keepdims=True)
    mlp = load_aesthetic_mlp(MLP_PATH)
    with torch.no_grad():
        got = mlp(torch.tensor(embed, dtype=torch.float32)).squeeze(1).numpy()
        again = mlp(torch.tensor(embed, dtype=torch.float32)).squeeze(1).numpy()
    np.testing.assert_allclose(got, numpy_mlp(state, embed), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got, again)  # eval mode: dropout is off
    assert np.all((got > 0) & (got < 10)), got  # LAION's scale is roughly 1..10


@needs_weights
def test_safetensors_copy_scores_the_same(tmp_path, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "mlp.safetensors")
    x = torch.nn.functional.normalize(
        torch.randn(3, 768, generator=torch.Generator().manual_seed(1))
    )
    with torch.no_grad():
        a = load_aesthetic_mlp(MLP_PATH)(x)
        b = load_aesthetic_mlp(tmp_path / "mlp.safetensors")(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


class NotATensor:
    pass


def test_bad_mlp_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mlp_path"):
        load_aesthetic_mlp(tmp_path / "missing.pth")
    wrong = {k: v[..., :3] if v.ndim == 2 else v for k, v in AestheticMLP().state_dict().items()}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="768-1024-128-64-16-1"):
        load_aesthetic_mlp(tmp_path / "wrong.pth")
    torch.save({"layers.0.weight": NotATensor()}, tmp_path / "object.pth")
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        load_aesthetic_mlp(tmp_path / "object.pth")


@needs_weights
def test_scorer_matches_a_manual_clip_embedding(scorer, state):
    # 32x32 images: the tiny CLIP's resize and center crop are identities, so the pixels are
    # (x / 255 - mean) / std, and the embedding is the projected pooled vision output.
    images = np.random.default_rng(2).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    rewards, info = scorer(images, ["a", "b", "c"])
    pixels = ((images / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2)  # [N, 3, 32, 32]
    with torch.no_grad():
        pooled = scorer.clip.vision_model(torch.tensor(pixels, dtype=torch.float32)).pooler_output
        embed = (pooled @ scorer.clip.visual_projection.weight.T).double().numpy()  # [N, 768]
    embed /= np.linalg.norm(embed, axis=1, keepdims=True)
    assert rewards.dtype == np.float32 and rewards.shape == (3,) and info == {}
    np.testing.assert_allclose(rewards, numpy_mlp(state, embed), rtol=0, atol=1e-5)


@needs_weights
def test_scorer_batches_and_resizes(scorer):
    images = np.random.default_rng(3).integers(0, 256, size=(3, 48, 48, 3), dtype=np.uint8)
    batched, _ = scorer(images, ["x"] * 3)  # batch_size 2: chunks of 2 + 1
    alone = np.concatenate([scorer(images[i : i + 1], ["x"])[0] for i in range(3)])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    assert len(set(np.round(batched, 5))) == 3  # different images, different scores
    assert scorer(images[:0], [])[0].shape == (0,)
    with pytest.raises(ValueError, match="uint8"):
        scorer(images.astype(np.float32), ["x"] * 3)


def test_scorer_needs_mlp_path():
    with pytest.raises(ValueError, match="mlp_path"):
        AestheticScorer("tiny", None, device="cpu")


def test_scorer_preprocesses_with_pil_on_every_machine(scorer):
    """The image processor is chosen, not left to whether torchvision is installed (which also
    printed transformers' fallback warning): PIL, as the LAION predictor was trained."""
    assert scorer.processor.backend == "pil"


def test_tiny_clip_leaves_no_files_behind(tmp_path, monkeypatch):
    # clip_model="tiny" builds a CLIP on disk to load it through from_pretrained; the files
    # must go once it is loaded, or every run of a tiny aesthetic task leaves a folder in /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scorer = AestheticScorer("tiny", "tiny", device="cpu")
    rewards, _ = scorer(np.zeros((2, 32, 32, 3), np.uint8), ["a", "b"])
    assert rewards.shape == (2,) and np.isfinite(rewards).all()
    # (torch may put its own inductor cache there if this is the first thing to ask for tempdir)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")] == []
