"""LocalEngine: the Engine the APIs call on one node — model store, tokenizers, runner processes.

A model gets a runner on first use (as Ollama loads on demand) or at start-up; requests are
templated and tokenized here so adapters and runners never parse each other's formats. A runner
that crashes is restarted with backoff; the agent itself keeps serving.

Every request in flight on this node (its own, and those it runs for peers) is tracked, so a
shutdown can end each one with a `Failed` event that its API formats as an error (`abort_all`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from agent.engine import ChatMessage, LoadedModel, ModelInfo, ModelNotFound
from agent.generation import Failed, Finished, GenerationEvent, GenerationRequest
from agent.models.store import ModelStore, info_from_dir
from agent.models.tokenizer import load_tokenizer
from agent.runtime.client import RunnerProcess, RunnerStartError
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.settings import NodeSettings
from agent.tools.formats import detect_tool_format
from agent.tools.types import ToolFormat

log = logging.getLogger("flock.engine")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class Router(Protocol):
    """The cluster's say in where a model's requests go (set by the cluster controller).

    `route` returns None when this node serves the model itself (its head runner is registered
    with `serve_instance`), or a function streaming a request from the node that does. It places
    the model first when nobody serves it yet, waiting a bounded time; it raises ModelNotFound
    when no node has the model.
    """

    async def route(self, model: str) -> RemoteStream | None: ...


RemoteStream = Callable[[GenerationRequest], AsyncIterator[GenerationEvent]]


def canonical_name(name: str) -> str:
    """Ollama clients send `name:latest`; flock's store has one version per name."""
    return name.removesuffix(":latest")


@dataclass
class Instance:
    name: str
    model_dir: Path
    info: ModelInfo
    tokenizer: Any
    runner: RunnerProcess
    started_at: float = field(default_factory=time.time)
    restarts: int = 0


class LocalEngine:
    """Serves the models of this node's store from runner subprocesses."""

    def __init__(self, settings: NodeSettings, store: ModelStore | None = None,
                 metrics: Any = None) -> None:
        self.settings = settings
        self.store = store or ModelStore(settings.models_dir)
        self.metrics = metrics
        self.instances: dict[str, Instance] = {}  # model name -> the head runner serving it here
        self.members: dict[str, RunnerProcess] = {}  # cluster runners by "instance/rank"
        self.router: Router | None = None
        # Fetches the weights a runner needs when this node's store lacks the model (a shard
        # from a peer, agent/models/shards.py); set by the cluster wiring.
        self.fetch_shard: Callable[[str, RunnerConfig], Awaitable[Path]] | None = None
        self.fetch_tokenizer: Callable[[str], Awaitable[Path]] | None = None
        # Info of models only other nodes hold (the cluster's catalogue); set by the cluster.
        self.remote_info: Callable[[str], ModelInfo | None] | None = None
        self.remote_models: Callable[[], list[ModelInfo]] = list
        self._tokenizers: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing = False
        self._restart_tasks: set[asyncio.Task[None]] = set()
        # The event queue of every tracked request in flight -> its request id (see `track`).
        self._tracked: dict[asyncio.Queue[GenerationEvent | Exception | None], str] = {}
        self._unavailable: str | None = None  # set by abort_all: why new requests are refused

    # ---- Engine protocol ------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        infos = {m.name: self.store.info(m.name) for m in self.store.list()}
        for instance in self.instances.values():
            infos.setdefault(instance.name, instance.info)
        for info in self.remote_models():
            infos.setdefault(info.name, info)
        return sorted(infos.values(), key=lambda m: m.name)

    def get_model(self, name: str) -> ModelInfo:
        name = canonical_name(name)
        if name in self.instances:
            return self.instances[name].info
        try:
            return self.store.info(name)
        except ModelNotFound:
            remote = self.remote_info(name) if self.remote_info else None
            if remote is None:
                raise
            return remote

    def loaded_models(self) -> list[LoadedModel]:
        return [
            LoadedModel(name=i.name,
                        size_bytes=i.runner.ready.weight_bytes if i.runner.ready else 0)
            for i in self.instances.values()
            if i.runner.alive
        ]

    async def tokenizer(self, model: str) -> Any:
        """The model's tokenizer, loaded once from the store (no runner needed)."""
        name = canonical_name(model)
        if name in self.instances:
            return self.instances[name].tokenizer
        if name not in self._tokenizers:
            try:
                model_dir = self.store.resolve(name)
            except ModelNotFound:
                if self.fetch_tokenizer is None:
                    raise
                model_dir = await self.fetch_tokenizer(name)  # from a peer that has the model
            self._tokenizers[name] = await asyncio.to_thread(load_tokenizer, model_dir)
        return self._tokenizers[name]

    async def render_chat(self, model: str, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        tokenizer = await self.tokenizer(model)
        conversation = [_message_dict(m) for m in messages]
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": True}
        if tools:
            kwargs["tools"] = tools
        # Off the event loop: templating and tokenizing a huge conversation takes seconds, and
        # the loop must keep answering probes and streaming other requests meanwhile.
        ids = await asyncio.to_thread(tokenizer.apply_chat_template, conversation, **kwargs)
        return list(ids)

    async def tool_format(self, model: str) -> ToolFormat:
        # The tokenizer's template is the one render_chat applies (a model given by path has
        # no store entry to read it from).
        tokenizer = await self.tokenizer(model)
        return detect_tool_format(getattr(tokenizer, "chat_template", None))

    async def tokenize(self, model: str, text: str) -> list[int]:
        tokenizer = await self.tokenizer(model)
        return list(await asyncio.to_thread(tokenizer.encode, text))

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        return self.track(request.id, self._generate(request))

    async def track(self, request_id: str, events: AsyncIterator[GenerationEvent],
                    ) -> AsyncIterator[GenerationEvent]:
        """`events`, tracked while in flight: `abort_all` can end them at any point with a
        Failed event. A task reads `events` into a queue, so a request waiting for its model,
        its runner or a peer can be ended as well as one that streams."""
        if self._unavailable is not None:
            await _close(events)
            yield Failed(id=request_id, code="unavailable", message=self._unavailable)
            return
        queue: asyncio.Queue[GenerationEvent | Exception | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for event in events:
                    queue.put_nowait(event)
            except Exception as exc:  # raised again in the consumer
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(None)
                await _close(events)

        self._tracked[queue] = request_id
        reader = asyncio.create_task(pump())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Finished | Failed):
                    return
        finally:
            self._tracked.pop(queue, None)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def abort_all(self, message: str) -> int:
        """End every tracked request in flight with Failed(code="unavailable"), and refuse new
        ones the same way (the node is shutting down); returns how many were ended."""
        self._unavailable = message
        for queue, request_id in list(self._tracked.items()):
            queue.put_nowait(Failed(id=request_id, code="unavailable", message=message))
        return len(self._tracked)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        try:
            remote = await self.router.route(request.model) if self.router else None
            if remote is not None:
                stream = remote(request)
                try:
                    async for event in stream:
                        yield event
                finally:
                    await stream.aclose()
                return
            instance = await self.ensure_loaded(request.model)
        except ModelNotFound as exc:
            yield Failed(id=request.id, code="not_found", message=str(exc))
            return
        except (RunnerStartError, TimeoutError) as exc:
            yield Failed(id=request.id, code="internal", message=f"the model failed to load: {exc}")
            return
        stream = instance.runner.generate(request)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    # ---- lifecycle ------------------------------------------------------------------------
    def context_length(self, model: str) -> int | None:
        instance = self.instances.get(canonical_name(model))
        if instance and instance.runner.ready:
            return instance.runner.ready.context_length
        return None

    async def ensure_loaded(self, model: str) -> Instance:
        name = canonical_name(model)
        instance = self.instances.get(name)
        if instance is not None and instance.runner.ready is not None:
            return instance
        if self.router is not None:
            # In a cluster only the controller starts runners (placement decides where).
            raise RunnerStartError(f"no instance of {name} is serving on this node")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            instance = self.instances.get(name)
            if instance is not None and instance.runner.ready is not None:
                return instance
            return await self._load(name)

    async def _load(self, name: str) -> Instance:
        model_dir = self.store.resolve(name)  # raises ModelNotFound
        info = self._info(name, model_dir)
        tokenizer = await asyncio.to_thread(load_tokenizer, model_dir)
        runner = self._new_runner(name, model_dir)
        started = time.perf_counter()
        await runner.start()
        log.info("model %s ready in %.1fs (%s)", name, time.perf_counter() - started,
                 runner.ready)
        instance = Instance(name=name, model_dir=model_dir, info=info, tokenizer=tokenizer,
                            runner=runner)
        self.instances[name] = instance
        return instance

    def _info(self, name: str, model_dir: Path) -> ModelInfo:
        try:
            return self.store.info(name)
        except (ModelNotFound, ValueError):
            return info_from_dir(model_dir, name)  # a path, or a shard fetched from a peer

    def _new_runner(self, name: str, model_dir: Path) -> RunnerProcess:
        s = self.settings
        config = RunnerConfig(
            model_name=name,
            model_dir=str(model_dir.resolve()),
            dtype="float32" if s.dtype == "auto" else s.dtype,
            max_batch=s.max_batch,
            max_queue=s.max_queue,
            prefill_chunk=s.prefill_chunk,
            prefill_gap_steps=s.prefill_gap_steps,
            memory_cap_bytes=s.memory_cap_bytes,
            kv_budget_bytes=s.kv_budget_bytes,
            prefix_cache_bytes=s.prefix_cache_bytes,
            compile_step=s.compile_step,
            fuse_projections=s.fuse_projections,
        )
        env, warning = runner_environment(s)
        if warning:
            log.warning(warning)
        return RunnerProcess(
            config,
            env,
            on_stats=lambda stats: self._on_stats(name, stats),
            on_exit=lambda code: self._on_runner_exit(name, code),
        )

    def _on_stats(self, name: str, stats: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.observe_runner_stats(name, stats)

    def _on_runner_exit(self, name: str, code: int | None) -> None:
        instance = self.instances.get(name)
        if self._closing or instance is None or instance.runner.ready is None:
            return
        log.error("runner for %s exited with code %s; restarting", name, code)
        if self.metrics is not None:
            self.metrics.runner_restarted(name)
        task = asyncio.get_running_loop().create_task(self._restart(instance))
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _restart(self, instance: Instance) -> None:
        delay = RESTART_BACKOFF_S[min(instance.restarts, len(RESTART_BACKOFF_S) - 1)]
        instance.restarts += 1
        await asyncio.sleep(delay)
        if self._closing:
            return
        runner = self._new_runner(instance.name, instance.model_dir)
        try:
            await runner.start()
        except RunnerStartError as exc:
            log.error("restart of %s failed: %s", instance.name, exc)
            self._on_runner_exit(instance.name, None)
            return
        instance.runner = runner

    # ---- cluster members ------------------------------------------------------------------
    async def start_member(self, key: str, model: str, config: RunnerConfig,
                           *, ranks_on_this_machine: int = 1) -> RunnerProcess:
        """Start one runner of a placed instance; a head (solo/head role) serves `model` here."""
        try:
            model_dir = self.store.resolve(model)
        except ModelNotFound:
            if self.fetch_shard is None:
                raise
            model_dir = await self.fetch_shard(model, config)
        env, warning = runner_environment(self.settings,
                                          ranks_on_this_machine=ranks_on_this_machine)
        if warning:
            log.warning(warning)
        config = msgspec.structs.replace(config, model_dir=str(model_dir.resolve()))
        runner = RunnerProcess(config, env, on_stats=lambda stats: self._on_stats(model, stats))
        self.members[key] = runner
        await runner.start(timeout=config.startup_timeout_s)
        if config.role in ("solo", "head"):
            info = self._info(model, model_dir)
            if model not in self._tokenizers:
                self._tokenizers[model] = await asyncio.to_thread(load_tokenizer, model_dir)
            tokenizer = self._tokenizers[model]
            self.instances[model] = Instance(name=model, model_dir=model_dir, info=info,
                                             tokenizer=tokenizer, runner=runner)
        return runner

    async def stop_member(self, key: str) -> None:
        runner = self.members.pop(key, None)
        if runner is None:
            return
        for name, instance in list(self.instances.items()):
            if instance.runner is runner:
                del self.instances[name]
        await runner.stop()

    async def unload(self, model: str) -> None:
        instance = self.instances.pop(canonical_name(model), None)
        if instance is not None:
            await instance.runner.stop()

    async def close(self) -> None:
        self._closing = True
        for task in list(self._restart_tasks):
            task.cancel()
        for name in list(self.instances):
            with contextlib.suppress(Exception):
                await self.unload(name)
        for key in list(self.members):
            with contextlib.suppress(Exception):
                await self.stop_member(key)

    def in_flight(self) -> int:
        """Requests in flight on this node: its own and those it runs for peers."""
        return len(self._tracked)


async def _close(events: AsyncIterator[GenerationEvent]) -> None:
    closer = getattr(events, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls is not None:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out
