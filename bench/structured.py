"""Structured output figures of the tools issue, measured through a real agent's OpenAI API.

    .venv/bin/python -m bench.structured [--rounds 3] [--tokens 128]

Prints `name: value` lines:
  free_decode_tok_s            decode tok/s of a free-text reply (streamed, greedy)
  constrained_decode_tok_s     decode tok/s of the same prompt under a JSON schema
  constrained_vs_free_decode   the second over the first (rounds alternate; medians)
  schema_valid_rate            share of 150 replies (50 prompts x 3 schemas: flat, nested with
                               arrays and enums, a union), run as one concurrent batch under
                               `response_format: json_schema`, that parse and validate
  structured_batch_s           wall time of those 150 requests

The prompts and schemas are shared with tests/test_structured_e2e.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
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


async def decode_rate(url: str, model: str, tokens: int, schema: dict[str, Any] | None,
                      ) -> tuple[float, int]:
    """(decode tok/s after the first token, tokens) of one streamed greedy reply."""
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": RATE_PROMPT}], "stream": True,
        "temperature": 0, "max_tokens": tokens, "stream_options": {"include_usage": True}}
    if schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "cities", "schema": schema}}
    first = last = 0.0
    count = 0
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client, \
            client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return rate, count


def main() -> int:
    from bench.single_node import MODEL, ensure_model, free_port, start_agent, wait_ready

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--models-dir", type=Path,
                        default=Path.home() / ".cache" / "flock-bench" / "models")
    args = parser.parse_args()
    ensure_model(args.models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        agent = start_agent(args.models_dir, Path(tmp) / "agent", port)
        try:
            wait_ready(url)
            asyncio.run(decode_rate(url, MODEL, 8, CITIES))  # warm-up: shapes and grammar
            asyncio.run(decode_rate(url, MODEL, 8, None))
            free: list[float] = []
            constrained: list[float] = []
            for _ in range(args.rounds):
                free.append(asyncio.run(decode_rate(url, MODEL, args.tokens, None))[0])
                constrained.append(asyncio.run(decode_rate(url, MODEL, args.tokens, CITIES))[0])
            started = time.perf_counter()
            replies = asyncio.run(run_structured(url, MODEL))
            batch_s = time.perf_counter() - started
        finally:
            agent.terminate()
            agent.wait(30)
    free_rate, constrained_rate = statistics.median(free), statistics.median(constrained)
    valid = sum(validates(text, SCHEMAS[name]) for name, text, _ in replies)
    print(f"free_decode_tok_s: {free_rate:.2f}")
    print(f"constrained_decode_tok_s: {constrained_rate:.2f}")
    print(f"constrained_vs_free_decode: {constrained_rate / free_rate:.2f}")
    print(f"schema_valid_rate: {valid / len(replies):.3f}")
    print(f"structured_batch_s: {batch_s:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
