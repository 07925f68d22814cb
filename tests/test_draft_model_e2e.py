"""A draft model of another tokenizer, end to end: `flock run --model M --draft D` serves M
without D and says why once (no runner restart loop), and a cluster.toml naming that draft is
refused by the API that deploys specs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from live_agent import running_agent

from tests.draft_models import make_smollm2_draft, with_swapped_tokens

pytestmark = pytest.mark.slow


def test_a_draft_of_another_vocabulary_is_refused_and_the_model_still_served(
        smollm2_dir: Path, tmp_path: Path) -> None:
    draft = make_smollm2_draft(smollm2_dir, tmp_path / "draft")
    swapped = with_swapped_tokens(draft, tmp_path / "swapped")
    with running_agent(tmp_path / "node", model=str(smollm2_dir),
                       args=["--draft", str(swapped)]) as agent:
        reply = httpx.post(f"{agent.url}/v1/completions", timeout=120, json={
            "model": str(smollm2_dir), "prompt": "The capital of France is",
            "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
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
