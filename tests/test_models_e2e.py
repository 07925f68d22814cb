"""The models people run, end to end through a real agent and the official clients: a 4-bit
mlx-community-style checkpoint served as stored (`--dtype keep`), and an architecture nothing
here can run refused at once, in each API's own error format, with no runner started."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from live_agent import LiveAgent, running_agent

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24


@dataclass
class Node:
    url: str
    model: str  # mlx_lm.convert's 4-bit SmolLM2 (group 64), the node's default model
    gguf_kept: str  # the Q4_1 GGUF imported with --dtype keep, asked for by path
    refused: str  # a model directory of an architecture nothing runs
    runners: list[int]  # the agent's runners once the kept model serves
    agent: LiveAgent


@pytest.fixture(scope="module")
def node(smollm2_4bit_dir: Path, smollm2_gguf: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    from agent.models.gguf import import_gguf

    gguf_kept = import_gguf(smollm2_gguf, tmp_path_factory.mktemp("gguf") / "q4_1", dtype="keep")
    refused = tmp_path_factory.mktemp("frobnicator")
    for file in smollm2_4bit_dir.iterdir():
        if file.suffix == ".json" and file.name != "config.json":
            shutil.copy(file, refused / file.name)
    config = json.loads((smollm2_4bit_dir / "config.json").read_text())
    (refused / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    state = tmp_path_factory.mktemp("node")
    with running_agent(state, model=str(smollm2_4bit_dir),
                       args=["--log-level", "warning", "--dtype", "keep"]) as agent:
        yield Node(agent.url, str(smollm2_4bit_dir), str(gguf_kept), str(refused),
                   agent.runner_pids(), agent)


def mlx_lm_greedy_text(model_dir: Path) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)


def test_kept_4bit_model_answers_as_mlx_lm_does_through_every_client(node: Node) -> None:
    chat = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused").chat.completions.create(
        model=node.model, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    text = chat.choices[0].message.content or ""
    assert text
    message = anthropic.Anthropic(base_url=node.url, api_key="unused").messages.create(
        model=node.model, max_tokens=MAX_TOKENS, messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"temperature": 0})
    assert message.content[0].text == text  # type: ignore[union-attr]
    client = ollama.Client(host=node.url)
    reply = client.chat(model=node.model, messages=QUESTION,
                        options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert reply.message.content == text
    # Greedy output equals mlx-lm's on the same quantized weights. (At 4 bits this 135M model
    # no longer knows the answer: mlx-lm's own output is the reference, not "Paris".)
    assert text == mlx_lm_greedy_text(Path(node.model))


def test_kept_q4_1_gguf_placed_on_demand_says_paris(node: Node) -> None:
    chat = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused").chat.completions.create(
        model=node.gguf_kept, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    assert "Paris" in (chat.choices[0].message.content or "")
    reply = ollama.Client(host=node.url).chat(
        model=node.gguf_kept, messages=QUESTION,
        options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert "Paris" in (reply.message.content or "")
    placements = httpx.get(f"{node.url}/cluster", timeout=10).json()["placements"]
    assert {p["model"]: p["dtype"] for p in placements}[node.gguf_kept] == "keep"


def test_kept_4bit_model_holds_its_stored_size(node: Node, smollm2_4bit_dir: Path) -> None:
    running = [m for m in ollama.Client(host=node.url).ps().models if m.model == node.model]
    assert len(running) == 1
    stored = sum(p.stat().st_size for p in smollm2_4bit_dir.glob("*.safetensors"))
    # Weights as loaded: the 4-bit file's size (norms widened to float32), far from the
    # ~540 MB float32 load.
    assert running[0].size is not None and running[0].size < 1.5 * stored
    cluster = httpx.get(f"{node.url}/cluster", timeout=10).json()
    assert {p["model"]: p["dtype"] for p in cluster["placements"]}[node.model] == "keep"


def test_unknown_architecture_is_refused_in_each_api_within_a_second(node: Node) -> None:
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="frobnicator"):
        openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused").chat.completions.create(
            model=node.refused, messages=QUESTION, max_tokens=4)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    with pytest.raises(anthropic.BadRequestError, match="frobnicator"):
        anthropic.Anthropic(base_url=node.url, api_key="unused").messages.create(
            model=node.refused, max_tokens=4, messages=QUESTION)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    with pytest.raises(ollama.ResponseError, match="frobnicator") as refused:
        ollama.Client(host=node.url).chat(model=node.refused, messages=QUESTION)
    assert time.monotonic() - started < 1.0
    assert refused.value.status_code == 400
    # The model is listed with why it cannot run; no runner was started for it.
    card = httpx.get(f"{node.url}/v1/models/{node.refused}", timeout=10).json()
    assert "frobnicator" in card["refusal"]
    runners = len(node.agent.runner_pids())
    placed = {p["model"] for p in httpx.get(f"{node.url}/cluster", timeout=10).json()["placements"]}
    assert node.refused not in placed and len(placed) == runners  # no runner for it
