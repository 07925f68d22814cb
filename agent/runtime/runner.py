"""The runner process: loads one model (or one stage of it), runs the scheduler, streams tokens.

It is the data plane: a runner that dies takes down one instance, never the agent. While it has
nothing to do it blocks on its control pipe (no spinning); while sequences run it polls the pipe
between steps so new requests join the running batch.
"""

from __future__ import annotations

import os
import select
import sys
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent.generation import Failed, Finished, TokenChunk
from agent.runtime.journal import Journal
from agent.runtime.links import StageLinkError
from agent.runtime.protocol import (
    Cancel,
    FrameBuffer,
    Ready,
    RunnerConfig,
    RunnerError,
    RunnerRole,
    Shutdown,
    Stats,
    Submit,
    frame,
    to_runner_decoder,
)
from agent.runtime.watchdog import Watchdog

WEIGHT_HEADROOM = 0.8  # share of free memory (after weights) the KV cache may take


class Outbox:
    """Frames to the agent. While `batching`, `send` only queues a frame and `flush` writes every
    queued one in one `os.write`: the serve loop flushes once per scheduling round, so the agent
    reads one step's tokens for all rows in one wake-up (on a core the runner shares, each
    wake-up also costs the runner its cache), rather than one per row. A request's first token
    goes out at once (time to first token does not wait for the rest of the round)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.batching = False
        self._pending: list[bytes] = []
        self._started: set[str] = set()  # requests that have sent a token

    def send(self, message: Any) -> None:
        self._pending.append(frame(message))
        if not self.batching or self._first_token(message):
            self.flush()

    def _first_token(self, message: Any) -> bool:
        if isinstance(message, TokenChunk):
            if message.id in self._started:
                return False
            self._started.add(message.id)
            return True
        if isinstance(message, Finished | Failed):
            self._started.discard(message.id)
        return False

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


def kv_budget(config: RunnerConfig, weight_bytes: int, bytes_per_token: int, context: int) -> int:
    """KV bytes this runner may use: what memory allows, never more than the batch can use."""
    from agent import sysinfo

    if config.kv_budget_bytes is not None:
        return config.kv_budget_bytes
    free = sysinfo.available_memory_bytes()
    if config.memory_cap_bytes is not None:
        free = min(free, max(0, config.memory_cap_bytes - weight_bytes))
    allowed = int(free * WEIGHT_HEADROOM)
    useful = config.max_batch * context * bytes_per_token
    return max(min(allowed, useful), 16 * bytes_per_token)


def choose_engine(config: dict[str, Any]) -> Literal["flock", "mlx-lm"]:
    """Which engine runs a model, as the architecture registry says: flock's decoder for the
    families it implements, mlx-lm's own modules for every other architecture mlx-lm ships.
    Unknown ones go to flock's decoder, whose refusal names the supported architectures."""
    from agent.models import arch

    return "mlx-lm" if arch.architecture(config).engine == "mlx-lm" else "flock"


def join_tensor_group(config: RunnerConfig, scratch: Path) -> Any:
    """This runner's mx.distributed group (ring here; jaccl on Macs, nccl on CUDA)."""
    import json

    import mlx.core as mx

    hostfile = scratch / f"flock-tp-{os.getpid()}.json"
    hostfile.write_text(json.dumps([[host] for host in config.tp_hosts]))
    os.environ["MLX_HOSTFILE"] = str(hostfile)
    os.environ["MLX_RANK"] = str(config.tp_rank)
    return mx.distributed.init(backend=config.tp_backend, strict=True)


def load(config: RunnerConfig, journal: Journal | None = None,
         group: Any = None) -> tuple[Any, Ready]:
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from agent.runtime import kernels
    from agent.runtime.blas import describe_blas
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import LayerRange, load_decoder, serving_dtype
    from agent.runtime.prefix import PrefixCache, prefix_cache_bytes
    from agent.runtime.sequences import SchedulerLimits

    started = time.perf_counter()
    model_dir = Path(config.model_dir)
    from agent import sysinfo

    available = sysinfo.available_memory_bytes()
    if config.memory_cap_bytes is not None:
        available = min(available, config.memory_cap_bytes)
    dtype = serving_dtype(config.dtype, model_dir, int(available * WEIGHT_HEADROOM))
    layers = None
    if config.layer_start is not None and config.layer_stop is not None:
        layers = LayerRange(config.layer_start, config.layer_stop)
    head = config.role in (RunnerRole.SOLO, RunnerRole.HEAD)
    # Tensor peers of the first stage embed the token ids themselves.
    peer_embeds = config.role == RunnerRole.TP_FOLLOWER and config.layer_start in (None, 0)
    # A pipeline's last stage holds the head weights too: it projects part of the vocabulary
    # for decode steps (`vocab_split.py`); None leaves that to the layer range.
    projects = None if config.role == RunnerRole.FOLLOWER else head
    decoder = load_decoder(model_dir, dtype=dtype, fuse=config.fuse_projections, layers=layers,
                           embeds=head or peer_embeds, projects=projects, group=group)
    tokenizer = load_tokenizer(model_dir)
    context = decoder.config.max_position_embeddings
    if config.context_length:
        context = min(context, config.context_length)
    # kv_bits 4 or 8: keys and values stored quantized along head_dim (KvGeometry.bytes_per_token
    # is then the quantized size, so the budget and the KV metrics count what is allocated).
    geometry = KvGeometry(len(decoder.layers), decoder.local_kv_heads, decoder.config.head_dim,
                          decoder.dtype, bits=config.kv_bits)
    weights = decoder.weight_bytes()
    budget = kv_budget(config, weights, geometry.bytes_per_token, context)
    limits = SchedulerLimits.for_runner(config, context_length=context, kv_budget_bytes=budget)
    # The extension is loaded (or refused, with its warning) now rather than at the first
    # prompt, so Ready says what this runner really computes attention with.
    loaded = kernels.enabled()
    attention = kernels.describe_kernels()
    if loaded and geometry.dtype != mx.float32:
        attention = f"pure MLX ({geometry.dtype} KV cache; the kernels read float32)"
    ready = Ready(
        model_name=config.model_name,
        weight_bytes=weights,
        kv_budget_bytes=budget,
        kv_bytes_per_token=geometry.bytes_per_token,
        context_length=context,
        load_seconds=time.perf_counter() - started,
        blas=describe_blas(),
        dtype="keep" if dtype is None else str(dtype).rpartition(".")[2],
        kernels=attention,
    )
    kv = KvSlots(geometry, journal=journal, limit_bytes=budget)
    prefix = PrefixCache(prefix_cache_bytes(config.prefix_cache_bytes, budget), journal=journal)
    return (decoder, tokenizer, kv, limits, prefix), ready


def load_draft(config: RunnerConfig, decoder: Any, dtype_name: str) -> Any:
    """The head's draft model (`draft_model.DraftModel`, loaded in the target's dtype, or a
    `draft_remote.RemoteDraft` when it asks a draft runner); None when it has none, or when it
    cannot load (said on stderr: the model is served anyway)."""
    if config.role not in (RunnerRole.SOLO, RunnerRole.HEAD):
        return None
    if config.draft_remote is not None:
        from agent.runtime.draft_remote import connect_remote_draft

        try:
            return connect_remote_draft(
                config.draft_remote, vocab=decoder.config.vocab_size,
                name=config.draft_name or "draft",
                deadline=time.monotonic() + config.startup_timeout_s,
                timeout=config.link_timeout_s)
        except StageLinkError as exc:
            print(f"flock runner: the remote draft model is not used: {exc}", file=sys.stderr)
            return None
    if config.draft_dir is None:
        return None
    import mlx.core as mx

    from agent.runtime.draft_model import load_draft_model

    dtype = None if dtype_name in ("", "keep") else getattr(mx, dtype_name)
    try:
        return load_draft_model(Path(config.draft_dir), Path(config.model_dir),
                                vocab=decoder.config.vocab_size, dtype=dtype,
                                compiled=config.compile_step, name=config.draft_name or "draft")
    except Exception as exc:
        print(f"flock runner: the draft model {config.draft_name} is not used: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _connect_pipeline(config: RunnerConfig, listener: Any) -> tuple[Any, Any]:
    """(downstream link, upstream link) for a head or a follower, within the start-up deadline."""
    from agent.runtime.links import StageLink

    deadline = time.monotonic() + config.startup_timeout_s
    timeout = config.link_timeout_s
    assert config.downstream is not None
    if config.role == RunnerRole.HEAD:
        downstream = StageLink.connect(config.downstream, deadline=deadline, timeout=timeout)
        upstream = StageLink.accept(listener, deadline=deadline, timeout=timeout)
    else:
        upstream = StageLink.accept(listener, deadline=deadline, timeout=timeout)
        downstream = StageLink.connect(config.downstream, deadline=deadline, timeout=timeout)
    listener.close()
    return downstream, upstream


def serve(config: RunnerConfig, inbox_fd: int, outbox: Outbox) -> int:
    import tempfile

    from agent.runtime.compute import HeadCompute
    from agent.runtime.constraints import constraint_factory
    from agent.runtime.follower import Follower, follow
    from agent.runtime.links import StageLink, listen
    from agent.runtime.model import read_config
    from agent.runtime.scheduler import Scheduler

    tensor = len(config.tp_hosts) > 1
    multi = config.role != RunnerRole.SOLO or tensor
    journal: Journal | None = [] if multi else None
    watchdog = Watchdog(config.link_timeout_s) if tensor else None
    if config.role == RunnerRole.DRAFT:
        return _serve_drafts(config, inbox_fd, outbox)
    try:
        # Listen before loading: the peer may connect while we are still reading weights.
        listener = listen(config.listen) if multi and config.listen else None
        engine = choose_engine(read_config(Path(config.model_dir)))
        if engine == "mlx-lm":
            from agent.runtime.mlxlm_engine import load_for_runner

            def budget(weights: int, per_token: int, context: int) -> int:
                return kv_budget(config, weights, per_token, context)

            group = join_tensor_group(config, Path(tempfile.gettempdir())) if tensor else None
            from agent.runtime.mlxlm_pipeline import load_stage

            (decoder, tokenizer, kv, limits, prefix, mlxlm_compute), ready = load_for_runner(
                config, budget, group, load_stage=load_stage)
            if config.role in ("head", "follower"):
                from agent.runtime.mlxlm_pipeline import (
                    PipelineFollower,
                    PipelineHeadCompute,
                    follow_pipeline,
                )

                downstream, upstream = _connect_pipeline(config, listener)
                if config.role == "follower":
                    outbox.send(ready)
                    return follow_pipeline(PipelineFollower(decoder.stage, kv), upstream,
                                           downstream, inbox_fd, watchdog)
                mlxlm_compute = PipelineHeadCompute(decoder, kv, decoder.stage, downstream,
                                                    upstream)
                limits = mlxlm_compute.agree(limits, config.startup_timeout_s)
                ready = msgspec.structs.replace(ready,
                                                kv_bytes_per_token=kv.geometry.bytes_per_token)
            elif tensor:
                from agent.runtime.mlxlm_tensor import TensorHeadCompute, follow_tensor

                deadline = time.monotonic() + config.startup_timeout_s
                if config.role == "tp_follower":
                    upstream = StageLink.accept(listener, deadline=deadline,
                                                timeout=config.link_timeout_s)
                    outbox.send(ready)
                    return follow_tensor(mlxlm_compute, upstream, inbox_fd, watchdog)
                peers = [StageLink.connect(peer, deadline=deadline,
                                           timeout=config.link_timeout_s)
                         for peer in config.tp_peers]
                mlxlm_compute = TensorHeadCompute(decoder, kv, peers)
            scheduler = Scheduler(decoder, tokenizer, kv, limits, outbox.send,
                                  prefix_cache=prefix, compute=mlxlm_compute,
                                  constraint_factory=constraint_factory(tokenizer))
            outbox.send(ready)
            return _serve_loop(config, scheduler, inbox_fd, outbox, watchdog)
        group = join_tensor_group(config, Path(tempfile.gettempdir())) if tensor else None
        (decoder, tokenizer, kv, limits, prefix), ready = load(config, journal, group)
        deadline = time.monotonic() + config.startup_timeout_s
        tp_peers = [StageLink.connect(peer, deadline=deadline, timeout=config.link_timeout_s)
                    for peer in config.tp_peers]
        if config.role == RunnerRole.TP_FOLLOWER:
            upstream = StageLink.accept(listener, deadline=deadline, timeout=config.link_timeout_s)
            outbox.send(ready)
            first_stage = config.layer_start in (None, 0)
            return follow(Follower(decoder, kv, compiled=config.compile_step,
                                   embeds=first_stage), upstream, None, inbox_fd, watchdog)
        if config.role == RunnerRole.FOLLOWER:
            downstream, upstream = _connect_pipeline(config, listener)
            outbox.send(ready)
            return follow(Follower(decoder, kv, compiled=config.compile_step), upstream,
                          downstream, inbox_fd, watchdog, tp_peers)
        compute = None
        if multi:
            assert journal is not None
            downstream = upstream = None
            if config.role == RunnerRole.HEAD:
                downstream, upstream = _connect_pipeline(config, listener)
            compute = HeadCompute(decoder, kv, journal, compiled=config.compile_step,
                                  tp_peers=tp_peers, downstream=downstream, upstream=upstream,
                                  microbatch=config.pipeline_microbatch)
        scheduler = Scheduler(decoder, tokenizer, kv, limits, outbox.send,
                              compiled=config.compile_step, prefix_cache=prefix,
                              compute=compute,
                              constraint_factory=constraint_factory(tokenizer),
                              prompt_lookup=config.prompt_lookup,
                              draft_model=load_draft(config, decoder, ready.dtype))
    except Exception as exc:  # the agent reports it; the runner must not hang
        outbox.send(RunnerError(message=f"{type(exc).__name__}: {exc}"))
        return 1
    outbox.send(ready)
    return _serve_loop(config, scheduler, inbox_fd, outbox, watchdog)


def _serve_drafts(config: RunnerConfig, inbox_fd: int, outbox: Outbox) -> int:
    """A draft runner: load the draft model, take the head's link, answer its proposals."""
    from agent.runtime.draft_remote import DraftServer, serve_drafts
    from agent.runtime.links import StageLink, listen
    from agent.runtime.model import load_decoder

    try:
        assert config.listen is not None, "a draft runner needs a listen address"
        started = time.perf_counter()
        listener = listen(config.listen)
        decoder = load_decoder(Path(config.model_dir))
        ready = Ready(model_name=config.model_name, weight_bytes=decoder.weight_bytes(),
                      kv_budget_bytes=0, kv_bytes_per_token=0,
                      context_length=decoder.config.max_position_embeddings,
                      load_seconds=time.perf_counter() - started)
        outbox.send(ready)
        link = StageLink.accept(listener, deadline=time.monotonic() + config.startup_timeout_s,
                                timeout=config.link_timeout_s)
        listener.close()
    except Exception as exc:
        outbox.send(RunnerError(message=f"{type(exc).__name__}: {exc}"))
        return 1
    return serve_drafts(DraftServer(decoder, compiled=config.compile_step), link, inbox_fd)


def _serve_loop(config: RunnerConfig, scheduler: Any, inbox_fd: int, outbox: Outbox,
                watchdog: Watchdog | None) -> int:
    outbox.batching = True
    try:
        return _serve_rounds(config, scheduler, inbox_fd, outbox, watchdog)
    finally:
        outbox.flush()
        outbox.batching = False


def _serve_rounds(config: RunnerConfig, scheduler: Any, inbox_fd: int, outbox: Outbox,
                  watchdog: Watchdog | None) -> int:
    """The serve loop proper; what a round sends goes out at its end (`Outbox.flush`)."""
    frames = FrameBuffer()
    next_stats = 0.0
    while True:
        outbox.flush()
        timeout = config.stats_interval_s if scheduler.idle else 0.0
        readable, _, _ = select.select([inbox_fd], [], [], timeout)
        if readable:
            data = os.read(inbox_fd, 1 << 20)
            if not data:
                return 0  # the agent is gone
            for body in frames.feed(data):
                message = to_runner_decoder.decode(body)
                if isinstance(message, Submit):
                    scheduler.submit(message.request)
                elif isinstance(message, Cancel):
                    scheduler.cancel(message.id)
                elif isinstance(message, Shutdown):
                    for request_id in list(scheduler.running):
                        scheduler.cancel(request_id)
                    scheduler.step()
                    scheduler.compute.close()
                    return 0
        try:
            if watchdog and not scheduler.idle:
                watchdog.arm()
            scheduler.step()
            if watchdog:
                watchdog.disarm()
        except StageLinkError as exc:
            # A pipeline stage died or hung: this instance cannot compute any more. Fail every
            # request now and exit, so the agent can re-place the model.
            for request_id in [*scheduler.running, *(r.id for r in scheduler.waiting)]:
                outbox.send(Failed(id=request_id, code="internal",
                                   message=f"a pipeline stage failed: {exc}"))
            return 3
        except Exception as exc:
            # A broken step fails the requests in it, not the runner.
            for request_id in list(scheduler.running):
                outbox.send(Failed(id=request_id, code="internal",
                                   message=f"generation failed: {type(exc).__name__}: {exc}"))
                scheduler.kv.release(scheduler.running[request_id].row)
                del scheduler.running[request_id]
        now = time.monotonic()
        if now >= next_stats:
            outbox.send(Stats(values=scheduler.snapshot()))
            next_stats = now + config.stats_interval_s


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = msgspec.json.decode(argv[0], type=RunnerConfig)
    # Keep the real stdout for frames; anything printed goes to stderr instead.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    code = serve(config, 0, Outbox(out_fd))
    sys.stderr.flush()
    # Every frame went out with os.write: skip interpreter and MLX teardown, which took 0.6 s
    # after a failed instance's last message (a retry in that gap found a dying runner).
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
