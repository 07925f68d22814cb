"""Node administration endpoints: liveness and readiness probes and the Prometheus metrics
(cluster endpoints come later)."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.exceptions import NotFoundException
from msgspec import Struct

from agent.api.common import ServicesDep
from agent.api.errors import openai_exception_handler


class ProbeStatus(Struct, kw_only=True):
    status: str


class AdminController(Controller):
    path = "/"
    tags = ["Admin"]
    exception_handlers = {Exception: openai_exception_handler}

    @get("/healthz", summary="Liveness: the agent process answers")
    async def healthz(self) -> ProbeStatus:
        return ProbeStatus(status="ok")

    @get("/readyz", summary="Readiness: the node can serve requests")
    async def readyz(self, services: ServicesDep) -> Response[ProbeStatus]:
        # 503 keeps load balancers and `flock up` waiting until the models are placed.
        if services.ready():
            return Response(ProbeStatus(status="ready"))
        return Response(ProbeStatus(status="starting"), status_code=503)

    @get("/metrics", summary="Prometheus metrics of this node")
    async def metrics(self, services: ServicesDep) -> Response[bytes]:
        if not services.metrics.enabled:
            raise NotFoundException("metrics are switched off on this node")
        return Response(services.metrics.render(), media_type=services.metrics.content_type)
