"""NodeEngine: the Engine the APIs call on one node — a runner pool and a router.

Requests are templated and tokenized here so adapters and runners never parse each other's
formats; the router says where each request goes (this node's head runner, or a peer's), the
pool runs this node's runners. A token takes one path, local or remote: from its source (the
head runner's pipe, or the HTTP stream from the peer holding the head) into the request's one
channel, and from there to the API.

Every request in flight on this node (its own, and those it runs for peers) is tracked, so a
shutdown can end each one with a `Failed` event that its API formats as an error (`abort_all`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from agent.engine import ChatMessage, LoadedModel, ModelInfo, ModelNotFound, canonical_name
from agent.generation import Failed, Finished, GenerationEvent, GenerationRequest, TokenChunk
from agent.models.store import ModelStore, info_from_dir
from agent.models.tokenizer import load_tokenizer
from agent.serving.pool import RunnerPool
from agent.serving.router import Destination, Router
from agent.tools.formats import detect_tool_format
from agent.tools.types import ToolFormat

WATCH_S = 0.5  # a remote stream idle this long checks that its instance's nodes are alive
# Failures that say the replica, not the request, is at fault: tried again on another replica
# when nothing streamed yet.
RETRY_CODES = ("internal", "unavailable", "overloaded")


class PeerModels(Protocol):
    """What the engine asks the cluster about models only other nodes hold."""

    def remote_info(self, model: str) -> ModelInfo | None: ...

    def remote_models(self) -> list[ModelInfo]: ...

    async def fetch_tokenizer(self, model: str) -> Path:
        """The model's tokenizer files, from a peer holding it; raises ModelNotFound."""
        ...


class _Channel:
    """One tracked request's events on their way to the API (the one queue a token passes on
    this node besides the runner's own)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[GenerationEvent | Exception | None] = asyncio.Queue()
        self.last_event = time.monotonic()
        self.watcher: asyncio.Task[None] | None = None  # a remote stream's liveness watch

    def put(self, item: GenerationEvent | Exception | None) -> None:
        self.last_event = time.monotonic()
        self.queue.put_nowait(item)

    def fail(self, code: str, message: str) -> None:
        self.queue.put_nowait(Failed(id=self.request_id, code=code, message=message))


# Opens a request's events once it knows where it goes (or says at once why it cannot run).
Source = Callable[[GenerationRequest, _Channel],
                  Awaitable[AsyncIterator[GenerationEvent] | Failed]]


class NodeEngine:
    """Serves models from this node's runners or through the router from a peer's."""

    def __init__(self, store: ModelStore, pool: RunnerPool, router: Router, *,
                 peers: PeerModels | None = None) -> None:
        self.store = store
        self.pool = pool
        self.router = router
        self.peers = peers
        self._tokenizers: dict[str, Any] = {}
        self._infos: dict[tuple[str, Path], ModelInfo] = {}
        self._tracked: dict[_Channel, None] = {}
        self._unavailable: str | None = None  # set by refuse_new: why new requests are refused

    # ---- models ---------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        infos = {m.name: self.store.info(m.name) for m in self.store.list()}
        for model, _ in self.pool.heads():
            with contextlib.suppress(ModelNotFound, OSError, ValueError):
                infos.setdefault(model, self.get_model(model))
        for info in self.peers.remote_models() if self.peers else []:
            infos.setdefault(info.name, info)
        return sorted(infos.values(), key=lambda m: m.name)

    def get_model(self, name: str) -> ModelInfo:
        name = canonical_name(name)
        head_dir = self.router.head_dir(name)
        if head_dir is not None:
            return self._info(name, head_dir)
        try:
            return self.store.info(name)
        except ModelNotFound:
            remote = self.peers.remote_info(name) if self.peers else None
            if remote is not None:
                return remote
            model_dir = self.store.resolve(name)  # a path to a model directory, or raises
            try:
                return self._info(name, model_dir)
            except (OSError, ValueError) as exc:
                raise ModelNotFound(name) from exc

    def stored_model(self, name: str) -> tuple[Path, ModelInfo]:
        """A model of this node's own store: its directory and info (raises ModelNotFound)."""
        return self.store.resolve(name), self.store.info(name)

    def model_dir(self, name: str) -> Path:
        """The directory of a model this node holds (a store name or a path)."""
        return self.store.resolve(name)

    def loaded_models(self) -> list[LoadedModel]:
        loaded: dict[str, LoadedModel] = {}
        for model, runner in self.pool.heads():
            size = runner.ready.weight_bytes if runner.ready else 0
            loaded.setdefault(model, LoadedModel(name=model, size_bytes=size))
        return list(loaded.values())

    def _info(self, name: str, model_dir: Path) -> ModelInfo:
        key = (name, model_dir)
        if key not in self._infos:
            try:
                self._infos[key] = self.store.info(name)
            except (ModelNotFound, ValueError):
                self._infos[key] = info_from_dir(model_dir, name)  # a path, or a peer's shard
        return self._infos[key]

    # ---- tokens in ------------------------------------------------------------------------
    async def tokenizer(self, model: str) -> Any:
        """The model's tokenizer, loaded once (from the store, or a peer's copy of its files)."""
        name = canonical_name(model)
        if name not in self._tokenizers:
            try:
                model_dir = self.router.head_dir(name) or self.store.resolve(name)
            except ModelNotFound:
                if self.peers is None:
                    raise
                model_dir = await self.peers.fetch_tokenizer(name)
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

    # ---- tokens out -----------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """A request from this node's APIs: routed to the head serving its model."""
        return self._tracked_stream(request, self._routed)

    def generate_here(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """A peer's request for a model whose head runs on this node (`/cluster/generate`)."""
        return self._tracked_stream(request, self._here)

    async def ensure_serving(self, model: str) -> None:
        """Wait until `model` is served somewhere in the cluster, placing it if needed."""
        await self.router.route(model)

    async def _routed(self, request: GenerationRequest, channel: _Channel
                      ) -> AsyncIterator[GenerationEvent] | Failed:
        try:
            destination = await self.router.route(request.model, request)
        except ModelNotFound as exc:
            return Failed(id=request.id, code="not_found", message=str(exc))
        except TimeoutError as exc:
            return Failed(id=request.id, code="internal",
                          message=f"the model failed to load: {exc}")
        return self._with_retry(request, channel, destination)

    async def _with_retry(self, request: GenerationRequest, channel: _Channel,
                          destination: Destination) -> AsyncIterator[GenerationEvent]:
        """The request's events from `destination`; a replica that fails it (or whose node is
        lost) before its first token is left for another replica of the model, while one is
        left. Once a token streamed, a failure is the request's: its text cannot be redone."""
        tried: set[str] = set()
        while True:
            instance_id = destination.route.instance_id
            book = self.router.serving if destination.runner is not None else \
                self.router.outgoing
            ticket = book.open(instance_id, len(request.prompt_tokens),
                               request.sampling.max_tokens)
            events = destination.open(request)
            try:
                first = await self._first_event(destination, events, request.id)
                retry = (not isinstance(first, TokenChunk)
                         and isinstance(first, Failed) and first.code in RETRY_CODES)
                if retry and self.router.alternatives(request.model,
                                                      frozenset(tried | {instance_id})):
                    tried.add(instance_id)
                    if self.router.metrics is not None:
                        self.router.metrics.replica_retried(canonical_name(request.model),
                                                            instance_id)
                else:
                    if destination.runner is None:
                        self._watch(destination, channel)
                    async for event in _chain(first, events):
                        if isinstance(event, TokenChunk):
                            ticket.tokens(max(1, len(event.token_ids)))
                        yield event
                    return
            finally:
                book.close(ticket)
                await _close(events)
            try:
                destination = await self.router.route(request.model, request,
                                                      exclude=frozenset(tried))
            except (ModelNotFound, TimeoutError):
                yield first
                return

    async def _first_event(self, destination: Destination, events: AsyncIterator[GenerationEvent],
                           request_id: str) -> GenerationEvent:
        """The first event of a stream; a remote stream whose instance loses a node before it
        says anything ends with a Failed (a cut link sends no FIN)."""
        nxt = asyncio.ensure_future(anext(events))
        try:
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=WATCH_S)
                if done:
                    try:
                        return nxt.result()
                    except StopAsyncIteration:
                        return Failed(id=request_id, code="internal",
                                      message="the stream ended early")
                lost = self.router.lost(destination.route)
                if lost is not None:
                    return Failed(id=request_id, code="internal",
                                  message=f"lost node {lost} serving the model (not heard from)")
        finally:
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await nxt

    def refusal(self, model: str) -> str | None:
        """Why `model` can never be served (its architecture), known before any placement."""
        try:
            return self.get_model(model).refusal
        except (ModelNotFound, OSError, ValueError):
            return None  # the router says whether anyone has it

    def generate_on(self, request: GenerationRequest,
                    instance_id: str | None) -> AsyncIterator[GenerationEvent]:
        """A peer's request for the replica `instance_id` (None: any) headed on this node."""
        return self._tracked_stream(request, lambda r, c: self._here(r, c, instance_id))

    async def _here(self, request: GenerationRequest, channel: _Channel,
                    instance_id: str | None = None) -> AsyncIterator[GenerationEvent] | Failed:
        found = await self.router.local_head(request.model, instance_id)
        if found is None or not found[1].alive:
            return Failed(id=request.id, code="unavailable" if instance_id else "internal",
                          message=f"{request.model} is not served on this node")
        return self._counted(found[0], found[1].generate(request), request)

    async def _counted(self, instance_id: str, events: AsyncIterator[GenerationEvent],
                       request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """A peer's request on this node's head, counted in the head's measured load."""
        ticket = self.router.serving.open(instance_id, len(request.prompt_tokens),
                                          request.sampling.max_tokens)
        try:
            async for event in events:
                if isinstance(event, TokenChunk):
                    ticket.tokens(max(1, len(event.token_ids)))
                yield event
        finally:
            self.router.serving.close(ticket)
            await _close(events)

    def _watch(self, destination: Destination, channel: _Channel) -> None:
        """A remote stream's watch: while it is quiet, check that every node of its instance is
        still heard from. A cut link sends no FIN: without this the request would hang until
        the head's own stage deadline (or forever, when the head itself is cut off)."""
        async def watch() -> None:
            while True:
                await asyncio.sleep(WATCH_S)
                if time.monotonic() - channel.last_event < WATCH_S:
                    continue
                lost = self.router.lost(destination.route)
                if lost is not None:
                    channel.fail("internal", f"lost node {lost} serving the model "
                                             "(not heard from)")
                    return

        channel.watcher = asyncio.create_task(watch())

    async def _tracked_stream(
        self, request: GenerationRequest,
        source: Source) -> AsyncIterator[GenerationEvent]:
        """The request's events, tracked while in flight: `abort_all` can end them at any point
        with a Failed event. A task reads the source into the channel, so a request waiting for
        its model, its runner or a peer can be ended as well as one that streams."""
        if self._unavailable is not None:
            yield Failed(id=request.id, code="unavailable", message=self._unavailable)
            return
        channel = _Channel(request.id)

        async def pump() -> None:
            events: AsyncIterator[GenerationEvent] | None = None
            try:
                opened = await source(request, channel)
                if isinstance(opened, Failed):
                    channel.put(opened)
                    return
                events = opened
                async for event in events:
                    channel.put(event)
            except Exception as exc:  # raised again in the consumer
                channel.put(exc)
            finally:
                channel.put(None)
                if events is not None:
                    await _close(events)

        self._tracked[channel] = None
        reader = asyncio.create_task(pump())
        try:
            while True:
                item = await channel.queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Finished | Failed):
                    return
        finally:
            self._tracked.pop(channel, None)
            for task in (reader, channel.watcher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    def refuse_new(self, message: str) -> None:
        """From now on every new request ends at once with Failed(code="unavailable"): the node
        is draining (those in flight go on)."""
        self._unavailable = message

    def abort_all(self, message: str) -> int:
        """End every tracked request in flight with Failed(code="unavailable"), and refuse new
        ones the same way (the node is shutting down); returns how many were ended."""
        self.refuse_new(message)
        for channel in list(self._tracked):
            channel.fail("unavailable", message)
        return len(self._tracked)

    def in_flight(self) -> int:
        """Requests in flight on this node: its own and those it runs for peers."""
        return len(self._tracked)

    async def close(self) -> None:
        await self.pool.close()


async def _chain(first: GenerationEvent, rest: AsyncIterator[GenerationEvent]
                 ) -> AsyncIterator[GenerationEvent]:
    yield first
    if isinstance(first, Finished | Failed):
        return
    async for event in rest:
        yield event


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
