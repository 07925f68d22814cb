"""Whether a draft model can draft for a target model: the same tokenizer, token for token.

Speculative decoding verifies a draft's token ids with the target model, so both must mean the
same thing by every id: the same vocabulary (token -> id, not merely the same size) and the same
special tokens (BOS/EOS/chat markers at the same ids). Pure: reads the two models' tokenizer
files (`tokenizer.json`, `tokenizer_config.json`, `config.json`) as plain data; no MLX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def tokenizer_facts(model_dir: Path) -> dict[str, Any]:
    """What a draft and its target must agree on, read from a model directory."""

    def read(name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((model_dir / name).read_text()))
        except (OSError, ValueError):
            return {}

    tokenizer, settings, config = (read("tokenizer.json"), read("tokenizer_config.json"),
                                   read("config.json"))
    model = tokenizer.get("model") or {}
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):  # unigram models: [[piece, score], ...]
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens") or []}
    specials = {key: _token_text(settings.get(key)) for key in SPECIAL_KEYS}
    eos = config.get("eos_token_id")
    return {"vocab": vocab, "added": added, "specials": specials,
            "eos_ids": sorted(eos) if isinstance(eos, list) else [eos],
            "bos_id": config.get("bos_token_id")}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        return value.get("content")
    return value


def tokenizer_mismatch(draft: dict[str, Any], target: dict[str, Any]) -> str | None:
    """None when the draft's tokenizer is the target's; else what differs, in a sentence."""
    if not draft["vocab"] or not target["vocab"]:
        return "a model has no tokenizer.json vocabulary to compare"
    if draft["vocab"] != target["vocab"]:
        if len(draft["vocab"]) == len(target["vocab"]):
            differing = next(t for t, i in draft["vocab"].items()
                             if target["vocab"].get(t) != i)
            return (f"the vocabularies have the same size ({len(draft['vocab'])}) but differ "
                    f"(token {differing!r} has id {draft['vocab'][differing]} in the draft, "
                    f"{target['vocab'].get(differing)} in the target)")
        return (f"the vocabularies differ ({len(draft['vocab'])} tokens in the draft, "
                f"{len(target['vocab'])} in the target)")
    if draft["added"] != target["added"]:
        return "the special (added) tokens differ"
    for key in ("specials", "eos_ids", "bos_id"):
        if draft[key] != target[key]:
            return f"the special tokens differ ({key}: {draft[key]} vs {target[key]})"
    return None


def check_draft_model(draft_dir: Path, target_dir: Path) -> None:
    """Raise ValueError naming the difference when `draft_dir` cannot draft for `target_dir`."""
    problem = tokenizer_mismatch(tokenizer_facts(draft_dir), tokenizer_facts(target_dir))
    if problem is not None:
        raise ValueError(f"the draft model {draft_dir.name} cannot draft for {target_dir.name}: "
                         f"{problem}")
