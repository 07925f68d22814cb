"""Predicted Outputs end to end: the official openai client sends `prediction` to a real agent
serving SmolLM2; the reply is what it is without one, and the usage reports the drafts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from live_agent import LiveAgent, running_agent

pytestmark = pytest.mark.slow

PASSAGE = ("The garden behind the house had been left alone for years. Tall grass grew between "
           "the stones of the path, and wild roses climbed over the broken fence.")
MESSAGES = [{"role": "user", "content": f"Repeat this text exactly:\n\n{PASSAGE}"}]


@pytest.fixture(scope="module")
def agent(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    state = tmp_path_factory.mktemp("node")
    # Prompt lookup off: the drafts (and the counts in the usage) come from the prediction.
    with running_agent(state, model=str(smollm2_dir), args=["--log-level", "warning"],
                       env={"FLOCK_PROMPT_LOOKUP": "false"}) as live:
        yield live


def test_predicted_outputs_draft_and_are_reported(agent: LiveAgent, smollm2_dir: Path) -> None:
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
    model = str(smollm2_dir)
    plain = client.chat.completions.create(model=model, messages=MESSAGES,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=48)
    text = plain.choices[0].message.content or ""
    assert plain.usage is not None and plain.usage.completion_tokens_details is not None
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0
    predicted = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=48,  # type: ignore[arg-type]
        prediction={"type": "content", "content": PASSAGE})
    assert predicted.choices[0].message.content == text
    usage = predicted.usage
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    details = usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens is not None
    assert details.accepted_prediction_tokens > 10
    assert details.rejected_prediction_tokens is not None
    # Streamed, with the usage chunk: the same text and figures.
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=48,  # type: ignore[arg-type]
        prediction={"type": "content", "content": [{"type": "text", "text": PASSAGE}]},
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    last = chunks[-1].usage
    assert last is not None and last.completion_tokens_details is not None
    assert last.completion_tokens_details.accepted_prediction_tokens == (
        details.accepted_prediction_tokens)
    # The runner's drafts reach the metrics (its stats arrive every second).
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(f"{agent.url}/metrics", timeout=10).text
        if _series(metrics, "flock_draft_accepted_tokens_total") > 0:
            break
        assert time.monotonic() < deadline, metrics[-2000:]
        time.sleep(0.2)
    assert _series(metrics, "flock_draft_tokens_total") >= _series(
        metrics, "flock_draft_accepted_tokens_total")
    assert 0 < _series(metrics, "flock_draft_acceptance_ratio") <= 1


def _series(metrics: str, name: str) -> float:
    """The sum of a metric's series in a Prometheus text exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name + "{"))
