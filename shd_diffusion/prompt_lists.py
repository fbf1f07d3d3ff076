"""Prompt lists given in a config: the prompts themselves, or a file of them (read and checked once)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .cli import BadInput

__all__ = ["PromptListError", "resolve_prompts"]

_PROMPT_KEYS = ("text", "prompt", "caption")  # fields of a .jsonl line, as t2i_sampling.read_prompts


class PromptListError(BadInput, ValueError):
    """A prompt list that cannot be used; the message names the setting and the fix."""


def resolve_prompts(value: Sequence[str] | str, setting: str = "train.validation_prompts") -> list[str]:
    """The prompts of a config value: a list of prompts, or a prompts file.

    Args:
        value: the prompts, or a ``.txt`` (one per line), ``.json`` (a list of strings) or
            ``.jsonl`` (one object with a ``text`` / ``prompt`` / ``caption`` field per line) file.
        setting: the config key, for messages.

    Returns:
        At least one non-blank prompt.

    Raises:
        PromptListError: an empty list, a blank prompt, a missing, unreadable or empty file (one line).
    """
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise PromptListError(f"{setting} file {path} not found: give a .txt (one prompt per line), .json or "
                                  ".jsonl file, or the prompts as a list")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                prompts = json.loads(text)
            elif path.suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                prompts = [r if isinstance(r, str) else next((r[k] for k in _PROMPT_KEYS if k in r), None)
                           for r in rows]
            else:
                prompts = [line.strip() for line in text.splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
            raise PromptListError(f"{setting} file {path} cannot be read ({type(err).__name__}: {err}): save it as "
                                  "UTF-8 text, one prompt per line") from None
        where = f"{setting} file {path}"
    else:
        prompts, where = value, setting
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PromptListError(f"{where} must hold a list of strings (a .jsonl line needs a \"text\" field)")
    if not prompts:
        raise PromptListError(f"{where} holds no prompts: give at least one, or set {setting} to null "
                              "(and train.sample_every / train.figure_every to 0)")
    blank = [i for i, p in enumerate(prompts) if not p.strip()]
    if blank:
        raise PromptListError(f"{where}: prompt {blank[0]} is blank: remove it (the unconditional image is not a "
                              "preview)")
    return list(prompts)
