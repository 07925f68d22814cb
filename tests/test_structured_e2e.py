"""Schema-constrained output from the real SmolLM2: 50 prompts x 3 schemas (flat, nested with
arrays and enums, a union) under OpenAI `response_format: json_schema`, sent as one concurrent
batch; every reply parses and validates. Prompts and schemas are bench/structured.py's."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from test_api_e2e import Node, node  # noqa: F401 (the module's agent fixture)

from bench.structured import SCHEMAS, cases, run_structured

pytestmark = pytest.mark.slow


def test_every_reply_of_a_150_request_batch_validates(node: Node) -> None:  # noqa: F811
    replies = asyncio.run(run_structured(node.url, node.model))
    assert len(replies) == len(cases()) == 150
    for name, text, finish in replies:
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    # Greedy decoding still follows the prompt: the replies are not all the same object.
    assert len({text for _, text, _ in replies}) > 100
