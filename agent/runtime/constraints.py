"""Constrained decoding: each sequence with a JSON schema or a grammar gets its own llguidance
matcher, which masks the tokens that would break it before sampling.

The scheduler calls the function `constraint_factory(tokenizer)` returns once per admitted
request, so every row of a continuous batch carries its own constraint (or none). A mask costs
tens of microseconds for JSON schemas on a 49k vocabulary, small next to a decode step.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np

from agent.generation import GenerationRequest
from agent.tools.grammar import json_schema_grammar, lark_grammar

log = logging.getLogger("flock.constraints")

COMPILED_CACHE = 64  # distinct grammars kept compiled; clients tend to reuse a few schemas


class GrammarConstraint:
    """One sequence's constraint: `allowed()` before sampling, `consume()` after it."""

    __slots__ = ("_eos", "_matcher", "_vocab")

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, eos: list[int]) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._eos = eos

    def allowed(self) -> mx.array:
        """The tokens that keep the output inside the grammar, as a bool mask over the vocab."""
        if self._matcher.is_error():
            # Cannot happen while only allowed tokens are sampled; if it does, end cleanly.
            mask = np.zeros(self._vocab, dtype=np.bool_)
            mask[self._eos] = True
            return mx.array(mask)
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self._vocab]
        return mx.array(mask.view(np.bool_))

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            log.warning("constraint rejected token %d: %s", token, self._matcher.get_error())

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar allows from here (nothing consumed):
        drafts are cut there, so a constrained row only drafts tokens it may emit."""
        if self._matcher.is_error():
            return 0
        return int(self._matcher.validate_tokens(tokens))

    def finished(self) -> bool:
        """True once nothing but the end of the output can follow (or the matcher broke)."""
        return self._matcher.is_stopped()


def model_vocab_size(tokenizer: Any) -> int | None:
    """The model's vocabulary (its logits' width), from the config beside the tokenizer; it
    can exceed the tokenizer's own (embeddings padded to a round size)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    path = Path(str(getattr(hf, "name_or_path", "") or "")) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def llg_tokenizer(tokenizer: Any, vocab_size: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of an mlx-lm tokenizer (a fast Hugging Face tokenizer inside)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("constrained decoding needs a fast (tokenizer.json) tokenizer, which "
                         "this model does not have")
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
    n_vocab = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True)) or None
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)


def request_grammar(request: GenerationRequest) -> str | None:
    """The llguidance grammar a request asks for; None for free text."""
    if request.grammar is not None:
        return lark_grammar(request.grammar)
    if request.json_schema is not None:
        return json_schema_grammar(request.json_schema)
    return None


def constraint_factory(tokenizer: Any, vocab_size: int | None = None,
                       ) -> Callable[[GenerationRequest], GrammarConstraint | None]:
    """Builds each request's constraint; raises ValueError for a grammar that cannot be used.

    The llguidance tokenizer (about 0.4 s to build) is made on the first constrained request,
    so runners that never see one pay nothing; compiled grammars are cached and copied.
    """
    state: dict[str, Any] = {}
    compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def lltok() -> llguidance.LLTokenizer:
        if "tokenizer" not in state:
            state["tokenizer"] = llg_tokenizer(
                tokenizer, vocab_size if vocab_size is not None else model_vocab_size(tokenizer))
        return state["tokenizer"]

    def build(request: GenerationRequest) -> GrammarConstraint | None:
        try:
            grammar = request_grammar(request)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the output schema cannot be used: {exc}") from None
        if grammar is None:
            return None
        template = compiled.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(lltok(), grammar, log_level=0)
            if template.is_error():
                what = "grammar" if request.grammar is not None else "JSON schema"
                raise ValueError(f"the {what} cannot be used for constrained decoding: "
                                 f"{template.get_error()}")
            compiled[grammar] = template
            if len(compiled) > COMPILED_CACHE:
                compiled.popitem(last=False)
        else:
            compiled.move_to_end(grammar)
        tok = lltok()
        return GrammarConstraint(template.deep_copy(), tok.vocab_size, list(tok.eos_tokens))

    return build
