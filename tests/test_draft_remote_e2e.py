"""Remote drafting end to end with two real agents on loopback: a `[[models]]` entry served on
node a with `draft_node = "b"` runs a draft runner on b, a's head asks it for drafts over the
link (its configuration points there, its drafted tokens rise: prompt lookup is off and the
head loads no draft itself), and the greedy answer is the one plain decoding gave before."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.models.store import ModelStore
from tests.cluster_requests import complete
from tests.cluster_tools import (
    MODEL,
    loopback_cluster,
    metric_total,
    runner_config,
    runner_pids,
    shared_models_dir,
)
from tests.draft_models import make_smollm2_draft

pytestmark = pytest.mark.slow

DRAFT = "smollm2-draft"
PLAIN_SPEC = f'[[models]]\nmodel = "{MODEL}"\nnodes = ["a"]\nprompt_lookup = false\n'
DRAFT_SPEC = PLAIN_SPEC + f'draft = "{DRAFT}"\ndraft_node = "b"\n'
PROMPT = "The capital of France is"


def models_with_draft(root: Path, smollm2_dir: Path, scratch: Path) -> Path:
    models = shared_models_dir(root, smollm2_dir)
    store = ModelStore(models)
    if DRAFT not in {m.name for m in store.list()}:
        made = make_smollm2_draft(smollm2_dir, scratch / "draft")

        def build(directory: Path) -> None:
            for item in made.iterdir():
                if item.is_file():
                    (directory / item.name).write_bytes(item.read_bytes())

        store.add(DRAFT, build, source=f"path:{made}", dtype="float32")
    return models


def test_a_draft_on_another_node_drafts_for_the_head(smollm2_dir: Path, tmp_path: Path) -> None:
    models = models_with_draft(tmp_path / "models", smollm2_dir, tmp_path)
    spec = tmp_path / "cluster.toml"
    spec.write_text(PLAIN_SPEC)
    with loopback_cluster(tmp_path, models) as cluster:
        a = cluster.start("a", cluster_file=spec)
        b = cluster.start("b", cluster_file=spec)
        cluster.wait_up(timeout=120)
        cluster.wait_serving(a, nodes=1, timeout=180)
        plain, _ = cluster.call(a, lambda c: complete(c, PROMPT, max_tokens=12), timeout=120)

        answer = cluster.post(a, "/cluster/spec", content=DRAFT_SPEC.encode(), timeout=30)
        assert answer.status_code == 200, answer.text

        def draft_runner_ready() -> bool:
            runners = cluster.status(b).get("runners", [])
            return any(r["role"] == "draft" and r["model"] == DRAFT and r["state"] == "ready"
                       for r in runners)

        cluster.wait_for("b's draft runner ready", draft_runner_ready, timeout=120)
        placement = cluster.wait_serving(a, nodes=1, timeout=120)
        assert placement["draft_node"] == cluster.node_ids()["b"], placement

        def head_config() -> dict[str, object] | None:
            configs = [runner_config(pid) for pid in runner_pids(a.pid)]
            return next((c for c in configs if c.get("draft_remote")), None)

        config = cluster.wait_for("a's head asking b", head_config, timeout=60)
        assert config["draft_dir"] is None and config["role"] == "solo", config
        drafted, _ = cluster.call(a, lambda c: complete(c, PROMPT, max_tokens=12), timeout=120)
        assert drafted == plain
        cluster.wait_for("drafts from b counted on a",
                         lambda: metric_total(cluster.metrics(a), "flock_draft_tokens_total") > 0,
                         timeout=30)
