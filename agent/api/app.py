"""The Litestar application: one controller per external API, shared services, API keys, CORS
and the body size limit.

Every error is answered in the wire format of the API it was sent to: each controller carries
its format's exception handler, and the app-level handler picks one by path for requests no
route matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.types import Guard

from agent import __version__
from agent.api.admin import AdminController
from agent.api.anthropic import AnthropicController
from agent.api.common import Pull, Services
from agent.api.errors import ApiError, unrouted_exception_handler
from agent.api.ollama import OllamaController, heartbeat
from agent.api.openai import OpenAIController
from agent.engine import Engine
from agent.metrics import FlockMetrics
from agent.metrics_off import create_metrics
from agent.settings import NodeSettings


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The key a client sent: `Authorization: Bearer` (OpenAI, Ollama) or `x-api-key`
    (Anthropic)."""
    authorization = connection.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return connection.headers.get("x-api-key") or None


def api_key_guard(keys: list[str]) -> Guard:
    accepted = [key.encode() for key in keys]

    def require_api_key(connection: ASGIConnection[Any, Any, Any, Any],
                        _handler: BaseRouteHandler) -> None:
        key = presented_key(connection)
        # Compare against every key, in constant time, so timing reveals nothing about them.
        matches = [hmac.compare_digest(key.encode(), k) for k in accepted] if key else []
        if not any(matches):
            raise ApiError("authentication",
                           "Missing or invalid API key: send it as 'Authorization: Bearer <key>' "
                           "or 'x-api-key: <key>'.")

    return require_api_key


def create_app(
    engine: Engine,
    settings: NodeSettings,
    *,
    ready: Callable[[], bool] = lambda: True,
    pull: Pull | None = None,
    metrics: FlockMetrics | None = None,
) -> Litestar:
    """The node's HTTP app. `pull` fetches a model for Ollama's /api/pull (absent: 501);
    `metrics` records every request and is served on /metrics (absent: metrics off)."""
    metrics = metrics if metrics is not None else create_metrics(enabled=False)
    services = Services(engine=engine, settings=settings, ready=ready, metrics=metrics,
                        pull=pull)
    guards = [api_key_guard(settings.api_keys)] if settings.api_keys else []
    apis = [
        Router(path="/", route_handlers=[controller], guards=guards)
        for controller in (OpenAIController, AnthropicController, OllamaController)
    ]
    cors = (
        CORSConfig(allow_origins=settings.cors_origins, expose_headers=["Retry-After"])
        if settings.cors_origins else None
    )
    return Litestar(
        route_handlers=[*apis, AdminController, heartbeat],
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        exception_handlers={Exception: unrouted_exception_handler},
        request_max_body_size=settings.max_body_bytes,
        cors_config=cors,
        openapi_config=OpenAPIConfig(title="flock", version=__version__),
        # Exception handlers count rejections here; they run outside dependency injection.
        state=State({"metrics": metrics}),
    )
