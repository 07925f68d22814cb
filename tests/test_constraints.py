"""Constrained decoding: llguidance masks in the real scheduler on a tiny random-weight model.

Random weights make free output garbage, so output that validates shows the constraint (not the
model) did the work; several requests with different schemas share one continuous batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from agent.runtime.constraints import constraint_factory, model_vocab_size
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from agent.runtime.scheduler import Scheduler, SchedulerLimits
from agent.tools.grammar import forced_call_grammar
from agent.tools.output import OutputStream, split_output
from agent.tools.reasoning import NO_REASONING
from agent.tools.types import ToolChoice, ToolFormat, ToolSpec
from tests.tiny_models import make_tiny_model

FLAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer", "minimum": 0,
                                                 "maximum": 150}},
        "required": ["name", "age"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "size": {"enum": ["S", "M", "L"]},
    # Bounded: a random model would otherwise write digits until max_tokens.
    "dims": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 0,
                                                    "maximum": 9999},
                                              "h": {"type": "integer", "minimum": 0,
                                                    "maximum": 9999}},
             "required": ["w", "h"], "additionalProperties": False},
}, "required": ["tags", "size", "dims"], "additionalProperties": False}
UNION = {"anyOf": [
    {"type": "object", "properties": {"kind": {"const": "ok"}, "value": {"type": "boolean"}},
     "required": ["kind", "value"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "error"},
                                      "code": {"type": "integer", "minimum": 100,
                                               "maximum": 599}},
     "required": ["kind", "code"], "additionalProperties": False},
]}
WEATHER = ToolSpec("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False})
CLOCK = ToolSpec("get_time", "", {"type": "object", "properties": {},
                                  "additionalProperties": False})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def make_scheduler(model_dir: Path) -> tuple[Scheduler, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    dec = load_decoder(model_dir)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim), chunk=32)
    tokenizer = load_tokenizer(model_dir)
    sched = Scheduler(dec, tokenizer, kv, SchedulerLimits(context_length=512, max_batch=8),
                      events.append, constraint_factory=constraint_factory(tokenizer))
    return sched, events


def request(rid: str, *, max_tokens: int = 160, temperature: float = 0.0, seed: int | None = None,
            **fields: object) -> GenerationRequest:
    prompt = [ord(c) % 200 + 3 for c in f"Answer in JSON ({rid}):"]
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens,
                                                     temperature=temperature, seed=seed),
                             **fields)  # type: ignore[arg-type]


def run(sched: Scheduler, events: list[GenerationEvent]) -> dict[str, tuple[str, GenerationEvent]]:
    for _ in range(3000):
        if sched.idle:
            break
        sched.step()
    out: dict[str, tuple[str, GenerationEvent]] = {}
    for event in events:
        text, _ = out.get(event.id, ("", event))
        if isinstance(event, TokenChunk):
            out[event.id] = (text + event.text, event)
        else:
            out[event.id] = (text, event)
    return out


def test_random_model_output_validates_against_each_schema_in_one_batch(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir)
    schemas = {"flat": FLAT, "nested": NESTED, "union": UNION}
    for name, schema in schemas.items():
        sched.submit(request(f"{name}-greedy", json_schema=schema))
        sched.submit(request(f"{name}-sampled", json_schema=schema, temperature=1.0, seed=7))
    sched.submit(request("free", max_tokens=20))
    results = run(sched, events)
    for name, schema in schemas.items():
        for mode in ("greedy", "sampled"):
            text, end = results[f"{name}-{mode}"]
            assert isinstance(end, Finished) and end.reason == "stop", (name, mode, text)
            jsonschema.validate(json.loads(text), schema)
    _, free_end = results["free"]
    assert isinstance(free_end, Finished) and free_end.reason == "length"


def test_constrained_output_ends_as_soon_as_the_json_is_complete(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir)
    sched.submit(request("r", json_schema={"enum": ["yes", "no"]}))
    text, end = run(sched, events)["r"]
    assert text in ('"yes"', '"no"')
    assert isinstance(end, Finished) and end.reason == "stop"
    assert end.usage.completion_tokens == len(text)  # one byte per token, no EOS needed


@pytest.mark.parametrize("fmt", ["hermes", "default", "llama3", "mistral", "glm45",
                                 "deepseek_v3", "deepseek_v31", "minimax", "harmony"])
def test_forced_call_grammar_output_parses_as_a_valid_call(tiny_dir: Path,
                                                          fmt: ToolFormat) -> None:
    sched, events = make_scheduler(tiny_dir)
    tools = [WEATHER, CLOCK]
    for i, choice in enumerate([ToolChoice("required"), ToolChoice("named", "get_weather"),
                                ToolChoice("required", parallel=False)]):
        grammar = forced_call_grammar(fmt, tools, choice)
        sched.submit(request(f"{fmt}-{i}", grammar=grammar, temperature=1.0, seed=i,
                             max_tokens=600))  # DeepSeek's markers are 20+ bytes each
    for rid, (text, end) in run(sched, events).items():
        assert isinstance(end, Finished) and end.reason == "stop", (rid, text)
        parsed = split_output(OutputStream(NO_REASONING, fmt, {"get_weather", "get_time"}),
                              text)
        assert parsed.calls and parsed.text == "", (rid, text)
        for call in parsed.calls:
            spec = WEATHER if call.name == "get_weather" else CLOCK
            if fmt != "minimax":  # MiniMax's values are bare text, not schema-constrained
                jsonschema.validate(call.arguments, spec.parameters)
        if rid.endswith(("-1", "-2")):
            assert len(parsed.calls) == 1
        if rid.endswith("-1"):
            assert parsed.calls[0].name == "get_weather"


def test_an_unusable_schema_fails_only_its_own_request_as_bad_request(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir)
    sched.submit(request("bad", json_schema={"type": "nonsense"}))
    sched.submit(request("bad-grammar", grammar="start: undefined_rule"))
    sched.submit(request("good", json_schema=FLAT))
    results = run(sched, events)
    for rid in ("bad", "bad-grammar"):
        _, end = results[rid]
        assert isinstance(end, Failed) and end.code == "bad_request"
    assert "nonsense" in results["bad"][1].message  # type: ignore[union-attr]
    assert isinstance(results["good"][1], Finished)


def test_mask_spans_the_models_vocabulary_and_requests_without_schema_get_none(
        tiny_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    build = constraint_factory(tokenizer)
    assert build(request("plain")) is None
    constraint = build(request("json", json_schema=FLAT))
    assert constraint is not None
    allowed = constraint.allowed()
    assert allowed.dtype == mx.bool_
    assert allowed.shape[0] >= model_vocab_size(tokenizer)  # type: ignore[operator]
    first = [t for t in range(allowed.shape[0]) if allowed[t].item()]
    assert [tokenizer.decode([t]) for t in first] == ["{"]
    constraint.consume(first[0])
    assert not constraint.finished()


def test_padded_model_vocabulary_widens_the_mask(tiny_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    real = model_vocab_size(tokenizer)
    assert real is not None
    constraint = constraint_factory(tokenizer, vocab_size=real + 64)(
        request("json", json_schema=FLAT))
    assert constraint is not None
    allowed = constraint.allowed()
    assert allowed.shape[0] >= real + 64
    assert not allowed[real:].any().item()


OPEN = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
# OPEN lists its properties and says nothing of others (no additionalProperties).


def test_schemas_generate_only_their_listed_properties_in_compact_json(tiny_dir: Path) -> None:
    """A schema that lists properties but says nothing of others gets only those (instructor's
    schemas ran out of tokens inside an invented "description" key); and the spacing is
    `json.dumps`'s, with no free whitespace between tokens."""
    sched, events = make_scheduler(tiny_dir)
    for seed in range(6):
        sched.submit(request(f"s{seed}", json_schema=OPEN, temperature=1.0, seed=seed))
    allowed = {**OPEN, "additionalProperties": {"type": "integer"}}  # the schema's own rule wins
    sched.submit(request("extra", json_schema=allowed, temperature=1.0, seed=1, max_tokens=200))
    results = run(sched, events)
    for seed in range(6):
        text, end = results[f"s{seed}"]
        assert isinstance(end, Finished) and end.reason == "stop", text
        value = json.loads(text)
        assert set(value) <= {"name", "n"}, text
        assert text == json.dumps(value, ensure_ascii=False), text
    text, end = results["extra"]
    if isinstance(end, Finished) and end.reason == "stop":
        jsonschema.validate(json.loads(text), allowed)


def test_an_unlisted_key_or_loose_whitespace_is_masked_out(tiny_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    build = constraint_factory(tokenizer)

    def accepts(text: str) -> bool:
        constraint = build(request("m", json_schema=OPEN))
        assert constraint is not None
        for token in tokenizer.encode(text, add_special_tokens=False):
            if not bool(constraint.allowed()[token].item()):
                return False
            constraint.consume(token)
        return True

    assert accepts('{"name": "a", "n": 1}')
    assert not accepts('{"name": "a", "description": "x"}')
    assert not accepts('{ "name": "a"}')
    assert not accepts('{"name":"a"}')
