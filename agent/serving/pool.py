"""The runner pool: every runner process of this node, keyed by "instance/rank".

The pool is told which runners should exist (`apply`, from the cluster's member convergence) and
makes it so: it starts each one, restarts one that exits or fails to start with backoff while it
is still wanted, and stops the ones no longer wanted. It is the one place that turns NodeSettings
into runner settings (`base_config`, `resolve_dtype`) and runner environments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.settings import NodeSettings

log = logging.getLogger("flock.pool")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 60.0  # a runner that served this long before dying restarts after the 1st delay
HEAD_ROLES = ("solo", "head")  # the runner of an instance that takes requests (rank 0)

# Where a runner's weights are: the store's directory, or a shard fetched from a peer.
Locate = Callable[[str, RunnerConfig], Awaitable[Path]]


def resolve_dtype(settings: NodeSettings) -> str:
    """The dtype runners compute in ("auto": float32, the fast one on MLX's CPU backend)."""
    return "float32" if settings.dtype == "auto" else settings.dtype


def base_config(settings: NodeSettings, *, context_length: int | None = None,
                kv_bits: int | None = None) -> RunnerConfig:
    """Every runner setting NodeSettings decides; placement fills in model, role and links."""
    s = settings
    return RunnerConfig(model_name="", model_dir="", dtype=resolve_dtype(s),
                        max_batch=s.max_batch, max_queue=s.max_queue,
                        prefill_chunk=s.prefill_chunk, prefill_gap_steps=s.prefill_gap_steps,
                        context_length=context_length, kv_bits=kv_bits,
                        memory_cap_bytes=s.memory_cap_bytes, compile_step=s.compile_step,
                        kv_budget_bytes=s.kv_budget_bytes,
                        prefix_cache_bytes=s.prefix_cache_bytes,
                        fuse_projections=s.fuse_projections,
                        pipeline_microbatch=s.pipeline_microbatch, prompt_lookup=s.prompt_lookup,
                        link_timeout_s=max(5.0, s.peer_timeout_s * 2))


@dataclass(frozen=True)
class RunnerPlan:
    """One runner this node should run: its model, its configuration (without the weights'
    directory, which the pool locates), and how many runners share this machine."""

    model: str
    config: RunnerConfig
    local_ranks: int = 1


@dataclass(frozen=True)
class RunnerState:
    """A runner as `/cluster` shows it."""

    key: str
    model: str
    role: str
    layers: tuple[int | None, int | None]
    state: str  # "starting", "ready", "failed"
    detail: str


@dataclass
class _Entry:
    key: str
    plan: RunnerPlan
    locate: Locate
    runner: RunnerProcess | None = None
    task: asyncio.Task[None] | None = None
    failures: int = 0
    state: str = "starting"
    detail: str = ""
    ready_at: float = 0.0
    stats_seen: object = None  # the runner's last stats message, to see it step
    stats_at: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    draft_refusal: str | None = None  # why its draft model was refused, if it was
    refused: bool = False  # a draft runner whose draft was refused: not started (no loop)


class RunnerPool:
    def __init__(self, settings: NodeSettings, *, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._entries: dict[str, _Entry] = {}
        self._closing = False
        # Where a model's tokenizer files are (the store's copy, or fetched from a peer): a draft
        # runner's node checks the draft against its target's tokenizer (set by convergence).
        self.tokenizer_dir: Callable[[str], Awaitable[Path]] | None = None

    def base_config(self, *, context_length: int | None = None,
                    kv_bits: int | None = None) -> RunnerConfig:
        return base_config(self.settings, context_length=context_length, kv_bits=kv_bits)

    # ---- what should run ----------------------------------------------------------------------
    async def apply(self, wanted: Mapping[str, RunnerPlan], locate: Locate) -> None:
        """Run exactly `wanted`: stop runners not in it (or whose configuration changed), start
        the missing ones. A runner that exits is restarted by the pool itself, with backoff."""
        for key in list(self._entries):
            plan = wanted.get(key)
            if plan is None or plan.config != self._entries[key].plan.config:
                await self.stop(key)
        for key, plan in wanted.items():
            if self._closing or key in self._entries:
                continue
            entry = self._entries[key] = _Entry(key, plan, locate)
            entry.task = asyncio.create_task(self._supervise(entry))

    async def stop(self, key: str) -> None:
        """Stop one runner for good (it is no longer wanted here)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.task is not None:
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry.task
        if entry.runner is not None:
            await entry.runner.stop()
        if self.metrics is not None:
            self.metrics.forget_runner(entry.plan.model, key)

    async def kill(self, key: str) -> None:
        """End a runner at once (its requests fail now); the pool restarts it like any dead one."""
        entry = self._entries.get(key)
        if entry is not None and entry.runner is not None:
            await entry.runner.stop(grace=0)

    async def close(self) -> None:
        self._closing = True
        for key in list(self._entries):
            with contextlib.suppress(Exception):
                await self.stop(key)

    # ---- what runs ---------------------------------------------------------------------------
    def serving(self, key: str) -> RunnerProcess | None:
        """The runner under `key` when it is up and has loaded its model."""
        entry = self._entries.get(key)
        runner = entry.runner if entry is not None else None
        if runner is None or not runner.alive or runner.ready is None or entry.state != "ready":
            return None
        return runner

    def model_dir(self, key: str) -> Path | None:
        """Where the runner under `key` loaded its weights from (a store entry or a shard)."""
        entry = self._entries.get(key)
        if entry is None or entry.runner is None:
            return None
        return Path(entry.runner.config.model_dir)

    def heads(self) -> list[tuple[str, RunnerProcess]]:
        """(model, runner) of every head runner serving here."""
        return [(e.plan.model, runner) for key, e in self._entries.items()
                if e.plan.config.role in HEAD_ROLES and (runner := self.serving(key))]

    def states(self) -> list[RunnerState]:
        out = []
        for e in self._entries.values():
            alive = e.runner is not None and e.runner.alive
            config = e.plan.config
            out.append(RunnerState(key=e.key, model=e.plan.model, role=config.role,
                                   layers=(config.layer_start, config.layer_stop),
                                   state=e.state if alive or e.state != "ready" else "failed",
                                   detail=e.detail))
        return out

    def stalled(self, after_s: float) -> list[str]:
        """Heads (pipeline heads, tensor rank 0) with requests in flight that have not stepped
        for `after_s`: runners report stats after steps, about every second."""
        now = time.monotonic()
        out = []
        for key, entry in self._entries.items():
            runner = entry.runner
            if runner is None or not runner.alive or entry.state != "ready":
                continue
            config = entry.plan.config
            if config.role != "head" and not config.tp_peers:
                continue
            if runner.last_stats is not entry.stats_seen:
                entry.stats_seen, entry.stats_at = runner.last_stats, now
                continue
            if runner.in_flight and now - entry.stats_at >= after_s:
                out.append(key)
        return out

    def in_flight(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.runner.in_flight if entry is not None and entry.runner else 0

    def stalled_for(self, key: str) -> float:
        entry = self._entries.get(key)
        return time.monotonic() - entry.stats_at if entry is not None else 0.0

    # ---- one runner's life -------------------------------------------------------------------
    async def _supervise(self, entry: _Entry) -> None:
        """Start the runner; when it exits (or fails to start), start it again after a backoff,
        for as long as it is wanted."""
        while not self._closing:
            if entry.failures:
                delay = RESTART_BACKOFF_S[min(entry.failures - 1, len(RESTART_BACKOFF_S) - 1)]
                await asyncio.sleep(delay)
                if self.metrics is not None:
                    self.metrics.runner_restarted(entry.plan.model, entry.key)
            entry.state = "starting"
            if not await self._start(entry):
                if entry.refused:
                    return  # said once; the head serves undrafted
                continue
            await entry.exited.wait()
            code = entry.exit_code
            stable = time.monotonic() - entry.ready_at > STABLE_AFTER_S
            entry.failures = 1 if stable else entry.failures + 1
            entry.state, entry.detail = "failed", f"runner exited (code {code})"
            log.warning("runner %s exited with code %s; restarting", entry.key, code)

    async def _start(self, entry: _Entry) -> bool:
        plan, started = entry.plan, time.monotonic()
        try:
            model_dir = await entry.locate(plan.model, plan.config)
            env, warning = runner_environment(self.settings,
                                              ranks_on_this_machine=plan.local_ranks)
            if warning:
                log.warning(warning)
            config = msgspec.structs.replace(plan.config, model_dir=str(model_dir.resolve()))
            if config.role == "draft":
                if await self._draft_refused(entry, config, model_dir):
                    return False
            else:
                config = await self._with_draft(entry, config, model_dir)
            exited = entry.exited = asyncio.Event()

            def on_exit(code: int | None) -> None:
                entry.exit_code = code
                exited.set()

            entry.runner = RunnerProcess(
                config, env, on_exit=on_exit,
                on_stats=lambda stats: self._on_stats(plan.model, entry.key, stats))
            await entry.runner.start(timeout=config.startup_timeout_s)
        except Exception as exc:
            entry.failures += 1
            entry.state, entry.detail = "failed", str(exc)
            log.warning("runner %s failed to start: %s", entry.key, exc)
            return False
        entry.state, entry.detail = "ready", ""
        if entry.draft_refusal is not None:
            entry.detail = f"draft model refused: {entry.draft_refusal}"
        entry.ready_at = time.monotonic()
        ready = entry.runner.ready
        log.info("runner %s (%s, layers %s-%s) ready in %.1fs; attention: %s", entry.key,
                 config.role, config.layer_start, config.layer_stop, entry.ready_at - started,
                 (ready.kernels if ready is not None else "") or "unknown")
        return True

    async def _with_draft(self, entry: _Entry, config: RunnerConfig, model_dir: Path
                          ) -> RunnerConfig:
        """A head's configuration with its draft model's directory, once the draft is found and
        shares the model's tokenizer; else without the draft (said once, never a restart loop:
        the model is served, just not drafted by that model)."""
        if config.draft_name is None:
            return config
        if config.role not in HEAD_ROLES:
            return msgspec.structs.replace(config, draft_name=None, draft_remote=None)
        from agent.spec import draft_problem

        whole = msgspec.structs.replace(config, model_name=config.draft_name, role="solo",
                                        layer_start=None, layer_stop=None)
        try:
            if config.draft_remote is not None and self.tokenizer_dir is not None:
                # A draft runner on another node: its small files (config, tokenizer) are
                # enough to check it here too, so that a refused draft is not waited for.
                draft_dir: Path | None = await self.tokenizer_dir(config.draft_name)
            elif config.draft_remote is not None:
                return config
            else:
                draft_dir = await entry.locate(config.draft_name, whole)
            problem = draft_problem(draft_dir, model_dir)
        except Exception as exc:
            draft_dir, problem = None, f"the draft model {config.draft_name} is not found: {exc}"
        if problem is not None:
            if entry.draft_refusal != problem:
                log.error("runner %s: draft model refused, serving %s without it: %s",
                          entry.key, entry.plan.model, problem)
            entry.draft_refusal = problem
            return msgspec.structs.replace(config, draft_name=None, draft_remote=None)
        entry.draft_refusal = None
        if config.draft_remote is not None:
            return config
        assert draft_dir is not None
        return msgspec.structs.replace(config, draft_dir=str(draft_dir.resolve()))

    async def _draft_refused(self, entry: _Entry, config: RunnerConfig, draft_dir: Path
                             ) -> bool:
        """A draft runner (its `draft_name` is the target) whose draft does not share the
        target's tokenizer: said once and not started; the head, finding no draft runner,
        serves undrafted."""
        from agent.spec import draft_problem

        target = config.draft_name
        problem: str | None = None
        if target is not None and self.tokenizer_dir is not None:
            try:
                target_dir = await self.tokenizer_dir(target)
            except Exception as exc:
                # No holder reachable yet: tried again after the restart backoff.
                entry.failures += 1
                entry.state, entry.detail = "failed", f"the tokenizer of {target}: {exc}"
                log.warning("runner %s: cannot check draft %s: the tokenizer of %s is not "
                            "found: %s", entry.key, entry.plan.model, target, exc)
                return True
            problem = draft_problem(draft_dir, target_dir)
        if problem is None:
            entry.draft_refusal = None
            return False
        log.error("runner %s: draft model %s refused, %s is served without it: %s",
                  entry.key, entry.plan.model, target, problem)
        entry.draft_refusal, entry.refused = problem, True
        entry.state, entry.detail = "failed", f"draft model refused: {problem}"
        return True

    def draft_refusal(self, key: str) -> str | None:
        """Why the runner under `key` runs without the draft model it was given, if it does."""
        entry = self._entries.get(key)
        return entry.draft_refusal if entry is not None else None

    def _on_stats(self, model: str, key: str, stats: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.observe_runner_stats(model, stats, key)
