"""`flock run`: one node's agent process — engine, HTTP listeners, graceful shutdown.

SIGTERM/SIGINT stop accepting new connections, let in-flight requests finish within a bound
(`shutdown_grace_s`), stop the runners, and exit 0: a deliberate stop stays stopped (service
managers restart crashes only). Shortly before the bound, requests still running are ended with
a "server shutting down" error in their API's format (a stream's error event, a 503), so no
client sees its connection simply drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator
from typing import Any

import uvicorn

from agent.settings import NodeSettings

log = logging.getLogger("flock")

SHUTDOWN_GRACE_S = 30.0  # the default of settings.shutdown_grace_s
SHUTTING_DOWN = "The server is shutting down; retry the request on another node or later."
# The request line and headers together; uvicorn's default parser (httptools) has no bound at
# all (8 MB of headers were accepted), so listeners use h11, which enforces this one (400).
MAX_HEADER_BYTES = 64 * 1024


class _Listener(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the agent (several share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _setup_logging(settings: NodeSettings) -> None:
    from agent.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format, settings.logs_dir)


def _metrics(settings: NodeSettings) -> Any:
    from agent import __version__, sysinfo
    from agent.metrics_off import create_metrics
    from agent.runtime.blas import describe_blas

    metrics = create_metrics(settings.metrics_enabled)
    metrics.set_build_info(__version__, sysinfo.backend_name(), describe_blas(settings))
    metrics.set_node_memory(sysinfo.total_memory_bytes(), sysinfo.available_memory_bytes())
    return metrics


def abort_margin_s(grace_s: float) -> float:
    """How long before the grace period ends the requests still running are ended: time for
    their error events to reach the clients before the listeners close."""
    return min(2.0, grace_s / 4)


async def _end_stragglers(engine: Any, grace_s: float) -> None:
    await asyncio.sleep(grace_s - abort_margin_s(grace_s))
    ended = engine.abort_all(SHUTTING_DOWN)
    if ended:
        log.warning("shutdown grace period ending: ended %d request(s) still in flight", ended)


def _puller(store: Any) -> Any:
    """Ollama's /api/pull: the same as `flock pull`, off the event loop."""
    from agent.models.fetch import pull

    async def pull_model(name: str) -> Any:
        stored = await asyncio.to_thread(pull, store, name)
        return store.info(stored.name)

    return pull_model


async def run_agent(settings: NodeSettings, *, started: asyncio.Event | None = None) -> int:
    from agent.api.app import create_app
    from agent.api.cluster import ClusterApi
    from agent.api.shards import ShardApi
    from agent.api.ui import UiController
    from agent.cluster.controller import ClusterController
    from agent.models.store import ModelStore
    from agent.serving.engine import NodeEngine
    from agent.serving.pool import RunnerPool
    from agent.serving.router import Router

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    metrics = _metrics(settings)
    spec, settings = _load_spec(settings)
    # The node's engine is a runner pool and a router; the controller decides what the pool
    # runs and where the router sends requests, and answers the engine's questions about
    # models only peers hold.
    store = ModelStore(settings.models_dir)
    pool = RunnerPool(settings, metrics=metrics)
    router = Router(pool, wait_s=settings.placement_wait_s)
    cluster = ClusterController(settings, store=store, pool=pool, router=router, spec=spec,
                                metrics=metrics)
    engine = NodeEngine(store, pool, router, peers=cluster)
    # No default model (None, or "" from FLOCK_MODEL= or flock.toml): ready at once.
    ready = {"value": not settings.model}
    app = create_app(engine, settings, ready=lambda: ready["value"], metrics=metrics,
                     pull=_puller(store))
    app.state["cluster"] = cluster
    app.state["engine"] = engine
    app.register(ClusterApi)
    app.register(ShardApi)
    app.register(UiController)
    listeners = [
        _Listener(uvicorn.Config(app, host=settings.host, port=port, log_level="warning",
                                 timeout_graceful_shutdown=settings.shutdown_grace_s,
                                 lifespan="on",
                                 http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES))
        for port in [settings.port, settings.ollama_port]
        if port is not None
    ]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    serving = [asyncio.create_task(listener.serve()) for listener in listeners]
    log.info("flock listening on http://%s:%d (node %s)", settings.host, settings.port,
             cluster.node_id)
    await cluster.start()
    if settings.cluster_file is not None:
        watcher = asyncio.create_task(cluster.watch_spec_file(settings.cluster_file))
        loop.add_signal_handler(signal.SIGHUP, cluster.reload_spec_file, settings.cluster_file)
    else:
        watcher = None
    from agent.api.ui_transfers import log_transfers

    transfers = asyncio.create_task(log_transfers(settings.models_dir))  # shard fetch progress
    if started is not None:
        started.set()
    load_task = None
    if settings.model:
        async def load_default() -> None:
            # The default model is placed like any other: on this node, or across the
            # cluster when it does not fit here. Ready once its head serves somewhere. A model
            # nothing here can run is said once (never retried: that cannot go away).
            refused = engine.refusal(settings.model)  # type: ignore[arg-type]
            if refused is not None:
                log.error("the default model %s cannot be served: %s", settings.model, refused)
                return
            while True:
                try:
                    await engine.ensure_serving(settings.model)  # type: ignore[arg-type]
                    ready["value"] = True
                    return
                except Exception as exc:
                    log.warning("waiting for %s: %s", settings.model, exc)
                    await asyncio.sleep(2.0)
        load_task = asyncio.create_task(load_default())

    stop_wait = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait([stop_wait, *serving], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in serving if t in done and t.exception() is not None]
    # Refused from here on, before the listeners close (that takes them a loop tick or more).
    engine.refuse_new(SHUTTING_DOWN)
    for listener in listeners:
        listener.should_exit = True
    log.info("shutting down: waiting up to %g s for %d in-flight requests",
             settings.shutdown_grace_s, engine.in_flight())
    stragglers = asyncio.create_task(_end_stragglers(engine, settings.shutdown_grace_s))
    await asyncio.gather(*serving, return_exceptions=True)
    stragglers.cancel()
    if load_task is not None:
        load_task.cancel()
    if watcher is not None:
        watcher.cancel()
    transfers.cancel()
    await cluster.stop()
    await engine.close()
    stop_wait.cancel()
    if failed:
        log.error("listener failed: %s", failed[0].exception())
        return 1
    return 0


def _load_spec(settings: NodeSettings) -> tuple[Any, NodeSettings]:
    """The cluster.toml this node starts from (if any), and settings with its secret and port."""
    from agent.spec import SpecFileError, cluster_secret, load_spec

    if settings.cluster_file is None:
        return None, settings
    try:
        spec = load_spec(settings.cluster_file)
    except SpecFileError as exc:
        raise SystemExit(f"flock: {settings.cluster_file} is invalid:\n"
                         + "\n".join(f"  {e}" for e in exc.errors)) from exc
    secret = settings.cluster_secret or cluster_secret(spec, settings.cluster_file)
    return spec, settings.model_copy(update={"cluster_secret": secret,
                                              "cluster_name": spec.cluster.name})


def serve(settings: NodeSettings) -> int:
    _setup_logging(settings)
    return asyncio.run(run_agent(settings))
