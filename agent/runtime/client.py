"""The agent's side of one runner process: start it, submit requests, route events back.

Every request gets its own queue; the reader task routes each event to its request. When the
runner exits, every request still in flight ends with a `Failed` event at once (never a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import msgspec

from agent.generation import Failed, Finished, GenerationEvent, GenerationRequest, TokenChunk
from agent.runtime.protocol import (
    Cancel,
    FrameBuffer,
    Ready,
    RunnerConfig,
    RunnerError,
    Shutdown,
    Stats,
    Submit,
    frame,
    from_runner_decoder,
)

log = logging.getLogger("flock.runner")

# The directory holding the `agent` package (a checkout, a venv's site-packages, or the zipapp's
# unpacked site-packages): the runner starts there so `-m agent.runtime.runner` always resolves.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class RunnerStartError(RuntimeError):
    """The runner process could not load its model."""


class RunnerProcess:
    def __init__(
        self,
        config: RunnerConfig,
        env: Mapping[str, str],
        *,
        on_stats: Callable[[dict[str, float]], None] | None = None,
        on_exit: Callable[[int | None], None] | None = None,
    ) -> None:
        self.config = config
        self.env = dict(env)
        self.on_stats = on_stats
        self.on_exit = on_exit
        self.ready: Ready | None = None
        self.last_stats: dict[str, float] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._queues: dict[str, asyncio.Queue[GenerationEvent]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ready_future: asyncio.Future[Ready] | None = None
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    async def start(self, timeout: float = 600.0) -> Ready:
        loop = asyncio.get_running_loop()
        self._ready_future = loop.create_future()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.runtime.runner",
            msgspec.json.encode(self.config).decode(),
            cwd=str(PACKAGE_ROOT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            limit=1 << 24,
        )
        self._reader = asyncio.create_task(self._read_loop())
        self._stderr_task = asyncio.create_task(self._log_stderr())
        try:
            self.ready = await asyncio.wait_for(self._ready_future, timeout)
        except BaseException:
            await self.stop(grace=0)
            raise
        return self.ready

    async def _log_stderr(self) -> None:
        assert self._process and self._process.stderr
        async for line in self._process.stderr:
            text = line.decode(errors="replace").rstrip()
            if text:
                log.info("[%s] %s", self.config.model_name, text)

    async def _read_loop(self) -> None:
        assert self._process and self._process.stdout
        frames = FrameBuffer()
        reason = "the runner exited"
        try:
            while True:
                data = await self._process.stdout.read(1 << 16)
                if not data:
                    break
                for body in frames.feed(data):
                    self._dispatch(from_runner_decoder.decode(body))
        except Exception as exc:  # a corrupt stream counts as a dead runner
            reason = f"lost the runner: {exc}"
            log.exception("runner stream failed")
        code = await self._process.wait()
        if self._ready_future and not self._ready_future.done():
            self._ready_future.set_exception(RunnerStartError(f"{reason} (exit code {code})"))
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(Failed(id=request_id, code="internal",
                                    message=f"{reason} (exit code {code}) during generation"))
        if self.on_exit:
            self.on_exit(code)

    def _dispatch(self, message: object) -> None:
        if isinstance(message, TokenChunk | Finished | Failed):
            queue = self._queues.get(message.id)
            if queue is not None:
                queue.put_nowait(message)
        elif isinstance(message, Stats):
            self.last_stats = message.values
            if self.on_stats:
                self.on_stats(message.values)
        elif isinstance(message, Ready):
            if self._ready_future and not self._ready_future.done():
                self._ready_future.set_result(message)
        elif (isinstance(message, RunnerError) and self._ready_future
              and not self._ready_future.done()):
            self._ready_future.set_exception(RunnerStartError(message.message))

    def _send(self, message: object) -> None:
        if not self.alive or self._process is None or self._process.stdin is None:
            raise ConnectionError("the runner is not running")
        self._process.stdin.write(frame(message))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Events of one request; leaving the iteration early cancels it in the runner."""
        if request.id in self._queues:
            raise ValueError(f"duplicate request id {request.id}")
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self._queues[request.id] = queue
        finished = False
        try:
            try:
                self._send(Submit(request))
            except ConnectionError as exc:
                finished = True
                yield Failed(id=request.id, code="internal", message=str(exc))
                return
            while True:
                event = await queue.get()
                if isinstance(event, Finished | Failed):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            self._queues.pop(request.id, None)
            if not finished and self.alive:
                with contextlib.suppress(ConnectionError):
                    self._send(Cancel(request.id))

    async def stop(self, grace: float = 10.0) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is not None:
            self._close_transport()
            return
        with contextlib.suppress(ConnectionError, OSError):
            self._send(Shutdown())
            if process.stdin:
                process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            # The runner may exit on its own between the check above and the kill.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if self._reader:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._close_transport()

    def _close_transport(self) -> None:
        """Close the pipes now, on the running loop; a transport left to the garbage collector
        after its loop is gone raises in __del__."""
        transport = getattr(self._process, "_transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
