"""Prompt text: what makes a prompt acceptable, and prompt files (one prompt a line).

`Config` checks every prompt of its sets with `prompt_problem`; the presets and `--prompts FILE`
read their sets with `read_prompt_file`.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

MAX_PROMPT_CHARS = 1000
"""Longer prompts are refused: the text encoder reads only the first 77 tokens (a few hundred
characters), and every prompt is written into config.json and every checkpoint."""


def prompt_problem(prompt: str) -> str | None:
    """What is wrong with one prompt (said after "the prompt ..."), or None."""
    if not isinstance(prompt, str) or not prompt.strip():
        return "is empty; every prompt needs some text"
    if len(prompt) > MAX_PROMPT_CHARS:
        return (
            f"is {len(prompt)} characters long; shorten it to at most {MAX_PROMPT_CHARS} (the "
            "text encoder reads only its first 77 tokens)"
        )
    bad = next((c for c in prompt if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"holds the control character {bad!r}; remove it (a prompt is one line of text)"
    return None


def read_prompt_file(path: Path | str) -> tuple[str, ...]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"prompt file {path} does not exist; pass a text file with one prompt a line"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err}); save it as UTF-8") from err
    prompts = []
    for number, line in enumerate(lines, 1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        problem = prompt_problem(prompt)
        if problem:
            raise ValueError(f"prompt file {path}, line {number}: the prompt {problem}")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts; write one prompt a line")
    return tuple(prompts)
