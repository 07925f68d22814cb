"""Draft models end to end: `flock run --model M --draft D` with D of another tokenizer serves M
without D and says why once (no runner restart loop), a cluster.toml naming that draft is
refused by the API that deploys specs, and one naming a draft of M's tokenizer is taken: M's
runner restarts with it, drafts, and answers as before."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from live_agent import metric_total, running_agent, wait_until

from tests.draft_models import make_smollm2_draft, with_swapped_tokens

pytestmark = pytest.mark.slow


def test_a_draft_of_another_vocabulary_is_refused_and_the_model_still_served(
        smollm2_dir: Path, tmp_path: Path) -> None:
    draft = make_smollm2_draft(smollm2_dir, tmp_path / "draft")
    swapped = with_swapped_tokens(draft, tmp_path / "swapped")
    # Prompt lookup off: every draft counted comes from the draft model.
    with running_agent(tmp_path / "node", model=str(smollm2_dir),
                       args=["--draft", str(swapped)],
                       env={"FLOCK_PROMPT_LOOKUP": "false"}) as agent:

        def complete() -> str:
            reply = httpx.post(f"{agent.url}/v1/completions", timeout=120, json={
                "model": str(smollm2_dir), "prompt": "The capital of France is",
                "max_tokens": 8, "temperature": 0})
            assert reply.status_code == 200, reply.text
            return str(reply.json()["choices"][0]["text"])

        plain = complete()
        log = agent.log_text()
        assert log.count("draft model refused") == 1, log[-3000:]
        assert "same size" in log
        status = httpx.get(f"{agent.url}/cluster", timeout=10).json()
        details = [r["detail"] for r in status["runners"]]
        assert any("draft model refused" in d and "same size" in d for d in details), status
        # The spec API: a [[models]] entry whose draft's vocabulary differs is not taken.
        spec = f'[[models]]\nmodel = "{smollm2_dir}"\ndraft = "{swapped}"\n'
        answer = httpx.post(f"{agent.url}/cluster/spec", content=spec.encode(), timeout=30)
        assert answer.status_code == 400, answer.text
        errors = answer.json()["errors"]
        assert any("models[0].draft" in e and "cannot draft for" in e for e in errors), errors
        # The runner started once: still the same process a moment later.
        pids = agent.runner_pids()
        time.sleep(0.5)
        assert agent.runner_pids() == pids and len(pids) == 1
        # A draft of the model's own tokenizer: taken, the runner restarts with it.
        spec = f'[[models]]\nmodel = "{smollm2_dir}"\ndraft = "{draft}"\n'
        answer = httpx.post(f"{agent.url}/cluster/spec", content=spec.encode(), timeout=30)
        assert answer.status_code == 200, answer.text
        wait_until(lambda: agent.runner_pids() and agent.runner_pids() != pids, 60,
                   "the runner to restart with its draft")

        def drafted() -> float:
            text = httpx.get(f"{agent.url}/metrics", timeout=10).text
            return metric_total(text, "flock_draft_tokens_total")

        wait_until(lambda: httpx.get(f"{agent.url}/readyz", timeout=5).status_code == 200, 60,
                   "ready")
        assert complete() == plain
        wait_until(lambda: drafted() > 0, 30, "draft-model drafts counted")
