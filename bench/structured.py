"""Structured output figures of the tools issue, measured on the runner's own scheduler.

    .venv/bin/python -m bench.structured [--rounds 3] [--tokens 128]

Prints `name: value` lines:
  free_decode_tok_s            decode tok/s of a free-text reply (greedy)
  constrained_decode_tok_s     decode tok/s of the same prompt under a JSON schema
  constrained_vs_free_decode   the second over the first (rounds alternate; medians)
  schema_valid_rate            share of 150 replies (50 prompts x 3 schemas: flat, nested with
                               arrays and enums, a union), run as one continuous batch under their
                               schema, that parse and validate
  structured_batch_s           wall time of those 150 requests

Each part runs in a worker process set up as a runner is (`runner.load`, the runner's BLAS
environment, the scheduler with `constraint_factory`), so figures are the runner's own, without
HTTP in the way. The prompts and schemas are shared with tests/test_structured_e2e.py, which
sends the same 150 requests through a real agent's OpenAI API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# --- the 150 structured requests --------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 30},
        "email": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city", "email"],
    "additionalProperties": False,
}
TASK = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "priority": {"enum": ["low", "medium", "high"]},
        "tags": {"type": "array", "items": {"enum": ["home", "work", "health", "money",
                                                     "travel"]},
                 "minItems": 1, "maxItems": 3},
        "steps": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"order": {"type": "integer", "minimum": 1, "maximum": 9},
                           "action": {"type": "string", "maxLength": 40}},
            "required": ["order", "action"], "additionalProperties": False}},
    },
    "required": ["title", "priority", "tags", "steps"],
    "additionalProperties": False,
}
ANSWER = {
    "anyOf": [
        {"type": "object",
         "properties": {"kind": {"const": "answer"},
                        "value": {"type": "number", "minimum": -1e9, "maximum": 1e9},
                        "unit": {"type": "string", "maxLength": 12}},
         "required": ["kind", "value", "unit"], "additionalProperties": False},
        {"type": "object",
         "properties": {"kind": {"const": "unknown"},
                        "reason": {"type": "string", "maxLength": 60}},
         "required": ["kind", "reason"], "additionalProperties": False},
    ]
}
SCHEMAS: dict[str, dict[str, Any]] = {"flat": PERSON, "nested": TASK, "union": ANSWER}

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jon"]
_CITIES = ["Lisbon", "Oslo", "Kyoto", "Lima", "Cairo"]
_TOPICS = ["fix the leaking kitchen tap", "prepare a tax return", "start running again",
           "plan a weekend in Rome", "clean the garage", "ask for a raise", "book a dentist",
           "renew a passport", "learn to bake bread", "move to a new flat"]
_VERBS = ["Plan", "Organise", "Break down", "Schedule", "Outline"]
_QUESTIONS = ["How tall is the Eiffel Tower?", "How many legs does a spider have?",
              "What is the boiling point of water?", "How far is the Moon?",
              "How heavy is an adult elephant?", "What will the weather be next year?",
              "How many people live in Tokyo?", "What is my neighbour thinking?",
              "How long is a marathon?", "How many days are in a leap year?"]
_STYLES = ["", " Be precise.", " Answer briefly.", " Use metric units.", " Think carefully."]


def prompts(schema: str) -> list[str]:
    """50 distinct prompts for one schema."""
    if schema == "flat":
        return [f"Invent a customer record for {n}, who lives in {c}, as JSON."
                for n in _NAMES for c in _CITIES]
    if schema == "nested":
        return [f"{v} this task as JSON with a title, priority, tags and steps: {t}."
                for t in _TOPICS for v in _VERBS]
    return [f"{q}{s} Reply in JSON." for q in _QUESTIONS for s in _STYLES]


def cases() -> list[tuple[str, str]]:
    """(schema name, prompt) for all 150 requests."""
    return [(name, p) for name in SCHEMAS for p in prompts(name)]


def structured_body(model: str, schema: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": schema, "schema": SCHEMAS[schema], "strict": True}}}


async def run_structured(url: str, model: str, max_tokens: int = 256, concurrency: int = 48,
                         ) -> list[tuple[str, str, str]]:
    """(schema name, reply text, finish reason) of every case, sent concurrently (bounded so
    the node's queue never overflows; continuous batching runs them together)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, schema: str, prompt: str) -> tuple[str, str, str]:
        async with gate:
            response = await client.post("/v1/chat/completions",
                                         json=structured_body(model, schema, prompt, max_tokens))
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return schema, choice["message"]["content"] or "", choice["finish_reason"]

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        return list(await asyncio.gather(*(one(client, s, p) for s, p in cases())))


def validates(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# --- decode rate with and without a schema ------------------------------------------------------

RATE_PROMPT = "List twelve large European cities with their country and population."
CITIES = {
    "type": "object",
    "properties": {"cities": {"type": "array", "minItems": 12, "maxItems": 12, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "country": {"type": "string", "maxLength": 24},
                       "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["name", "country", "population"], "additionalProperties": False}}},
    "required": ["cities"],
    "additionalProperties": False,
}


@dataclass
class Reply:
    text: str = ""
    tokens: int = 0
    finish: str = ""
    first: float = 0.0  # when its first token came out (perf_counter)
    last: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 else 0.0


class Runner:
    """A scheduler built the way the runner process builds it, driven in this process."""

    def __init__(self, model_dir: str) -> None:
        from agent.runtime.constraints import constraint_factory
        from agent.runtime.protocol import RunnerConfig
        from agent.runtime.runner import load
        from agent.runtime.scheduler import Scheduler

        config = RunnerConfig(model_name="bench", model_dir=model_dir, max_queue=256)
        (decoder, tokenizer, kv, limits, prefix), _ = load(config)
        self.tokenizer = tokenizer
        self.replies: dict[str, Reply] = {}
        self.scheduler = Scheduler(decoder, tokenizer, kv, limits, self._event,
                                   compiled=config.compile_step, prefix_cache=prefix,
                                   constraint_factory=constraint_factory(tokenizer))
        self._count = 0

    def _event(self, event: Any) -> None:
        from agent.generation import Failed, Finished, TokenChunk

        reply = self.replies.setdefault(event.id, Reply())
        if isinstance(event, TokenChunk):
            now = time.perf_counter()
            reply.first = reply.first or now
            reply.last = now
            reply.text += event.text
            reply.tokens += len(event.token_ids)
        elif isinstance(event, Finished):
            reply.finish = event.reason
        elif isinstance(event, Failed):
            reply.finish = f"failed: {event.message}"

    def run(self, prompts: list[str], max_tokens: int,
            schemas: list[dict[str, Any] | None]) -> list[Reply]:
        """Greedy replies to chat prompts, all submitted at once (one continuous batch)."""
        from agent.generation import GenerationRequest, SamplingParams

        ids = []
        for prompt, schema in zip(prompts, schemas, strict=True):
            self._count += 1
            rid = f"r{self._count}"
            tokens = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True)
            self.scheduler.submit(GenerationRequest(
                id=rid, model="bench", prompt_tokens=list(tokens),
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                json_schema=schema))
            ids.append(rid)
        while not self.scheduler.idle:
            self.scheduler.step()
        return [self.replies.pop(rid) for rid in ids]


def decode_rates(model_dir: str, tokens: int, rounds: int) -> dict[str, list[float]]:
    """Worker: decode tok/s of the rate prompt, free and under CITIES, rounds alternating."""
    runner = Runner(model_dir)
    runner.run([RATE_PROMPT, RATE_PROMPT], 8, [None, CITIES])  # warm-up: shapes, grammar
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(rounds):
        for name, schema in (("free", None), ("constrained", CITIES)):
            (reply,) = runner.run([RATE_PROMPT], tokens, [schema])
            rates[name].append(reply.decode_tok_s)
    return rates


def structured_replies(model_dir: str, max_tokens: int) -> dict[str, Any]:
    """Worker: the 150 structured requests as one batch; their texts, finishes and wall time."""
    runner = Runner(model_dir)
    started = time.perf_counter()
    replies = runner.run([p for _, p in cases()], max_tokens,
                         [SCHEMAS[name] for name, _ in cases()])
    return {"seconds": time.perf_counter() - started,
            "replies": [(name, r.text, r.finish) for (name, _), r in zip(cases(), replies,
                                                                         strict=True)]}


def main() -> int:
    from agent.runtime.environment import runner_environment
    from agent.settings import NodeSettings
    from bench.common import bench_models, call_in_subprocess, warn_if_busy

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="max_tokens of each structured request")
    parser.add_argument("--models-dir", type=Path,
                        help="model store to pull SmolLM2 into (default: the tests' import, "
                             "else ~/.cache/flock-bench/models)")
    args = parser.parse_args()
    warn_if_busy()
    model_dir = str(bench_models(args.models_dir)[1])
    env, _ = runner_environment(NodeSettings())
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    # Workers run in fresh interpreters with the runner's environment (the BLAS preload is
    # process-wide).
    rates = call_in_subprocess("bench.structured:decode_rates", {
        "model_dir": model_dir, "tokens": args.tokens, "rounds": args.rounds}, env,
        timeout=3600)
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    print(f"free_decode_tok_s: {free:.2f}", flush=True)
    print(f"constrained_decode_tok_s: {constrained:.2f}", flush=True)
    print(f"constrained_vs_free_decode: {constrained / free:.2f}", flush=True)
    batch = call_in_subprocess("bench.structured:structured_replies", {
        "model_dir": model_dir, "max_tokens": args.max_tokens}, env, timeout=3600)
    valid = sum(validates(text, SCHEMAS[name]) for name, text, _ in batch["replies"])
    print(f"schema_valid_rate: {valid / len(batch['replies']):.3f}")
    print(f"structured_batch_s: {batch['seconds']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
