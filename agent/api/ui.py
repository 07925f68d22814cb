"""The web dashboard: its static files (`agent/ui/`, inside the package and the zipapp) and the
endpoints only it uses.

The page talks to the node that served it and nothing else: `/ui/api/overview` answers with
this node's `/cluster` status plus every node's live figures, which this node gathers from its
peers over signed agent-to-agent calls (`/ui/api/live`), so no browser ever needs CORS. Who may
read and act follows the API's rules (`agent.api.cluster`): with API keys, a key for anything
but the static files and `/ui/api/auth` (which only says what the page must ask for); admin
actions (pull, remove, place) need a key, or loopback in open mode, and in secret mode without
keys they are disabled. Any admin call whose `Origin` is another site's is refused, so no other
web page open in the user's browser can act on the cluster through it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.response import Stream

from agent.api.guards import admin_error, is_loopback, key_error, peer_signature_error
from agent.api.ui_figures import node_figures
from agent.api.ui_transfers import in_flight
from agent.cluster.auth import ReplayGuard
from agent.cluster.peers import PeerError, base_url, response_headers

log = logging.getLogger("flock.ui")

LIVE_PATH = "/ui/api/live"
STATIC = {"app.js": "text/javascript", "app.css": "text/css",
          "index.html": "text/html"}
PEER_TIMEOUT_S = 1.5  # a dead peer must not hold the whole page's refresh
DOCTOR_TIMEOUT_S = 60.0
_replay_guard = ReplayGuard()
_files: dict[str, bytes] = {}


def static_file(name: str) -> bytes:
    """A file of agent/ui (read once: they do not change while the node runs)."""
    if name not in _files:
        _files[name] = resources.files("agent.ui").joinpath(name).read_bytes()
    return _files[name]


def dashboard_page() -> Response[bytes]:
    return Response(static_file("index.html"), media_type=STATIC["index.html"],
                    headers={"Cache-Control": "no-cache"})


def wants_html(accept: str) -> bool:
    """A browser's navigation (Accept lists text/html), not a client's heartbeat probe."""
    return "text/html" in accept.lower()


def _cluster(request: Request[Any, Any, Any]) -> Any:
    return request.app.state["cluster"]


def _json(content: Any, status: int = 200) -> Response[Any]:
    return Response(msgspec.json.encode(content), status_code=status,
                    media_type="application/json")


def _error(status: int, message: str) -> Response[Any]:
    kind = {401: "authentication_error", 403: "permission_error"}.get(status, "ui_error")
    return _json({"error": {"message": message, "type": kind}}, status)


def admin_rule(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """What the page may do and why: `admin` is "key" (send the API key), "loopback" (open
    mode, this browser is on loopback), "refused" (open mode, not loopback) or "disabled"
    (secret mode without API keys: admin calls need a member's signature)."""
    cluster = _cluster(request)
    keys = bool(cluster.settings.api_keys)
    if keys:
        admin, note = "key", "admin actions use your API key"
    elif cluster.secret:
        admin, note = "disabled", ("this cluster has a secret but no API keys, so admin actions "
                                   "are disabled here: start the nodes with --api-key KEY "
                                   "(or FLOCK_API_KEYS) to enable them")
    elif is_loopback(request):
        admin, note = "loopback", "open mode: admin actions are accepted from this machine only"
    else:
        admin, note = "refused", ("open mode: admin actions are accepted from loopback only; "
                                  "open the dashboard on the node itself, or set API keys")
    return {"keys_required": keys, "mode": cluster.auth_mode, "admin": admin, "note": note}


async def _admin_problem(request: Request[Any, Any, Any], body: bytes) -> Response[Any] | None:
    problem = await admin_error(request, body)  # the Origin check first
    if problem is None:
        return None
    return _error(403 if "loopback" in problem or "Origin" in problem else 401, problem)


def _read_problem(request: Request[Any, Any, Any]) -> Response[Any] | None:
    problem = key_error(request, _cluster(request).settings.api_keys)
    return _error(401, problem) if problem else None


async def _peer_figures(cluster: Any, profile: Any) -> tuple[str, dict[str, Any]]:
    url = base_url(profile.addresses[0], profile.api_port) + LIVE_PATH
    try:
        answer = await cluster.client.request("GET", url, timeout_s=PEER_TIMEOUT_S)
        if answer.status_code != 200:
            return profile.node_id, {"error": f"{answer.status_code} {answer.text[:200]}"}
        return profile.node_id, answer.json()
    except (PeerError, ValueError) as exc:
        return profile.node_id, {"error": str(exc)}


def _own_figures(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """This node's live figures and its runners' states (each node knows only its own)."""
    figures = node_figures(request.app.state["metrics"])
    figures["transfers"] = in_flight(_cluster(request).settings.models_dir)
    figures["runners"] = [{"key": r.key, "model": r.model, "role": r.role,
                           "layers": list(r.layers), "state": r.state, "detail": r.detail}
                          for r in _cluster(request).pool.states()]
    return figures


def _models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    engine = request.app.state["engine"]
    cluster = _cluster(request)
    store = []
    for model in engine.store.list():
        try:
            info = engine.store.info(model.name)
        except (OSError, ValueError) as exc:
            store.append({"name": model.name, "error": str(exc)})
            continue
        store.append({"name": info.name, "architecture": info.architecture,
                      "quantization": info.quantization, "size_bytes": info.size_bytes,
                      "engine": info.engine, "refusal": info.refusal})
    holders: dict[str, list[str]] = {}
    for node_id, profile in cluster.nodes().items():
        for name in profile.models:
            holders.setdefault(name, []).append(node_id)
    from agent.models import cards

    return {"store": store, "catalogue": [{"name": n, "nodes": sorted(h)}
                                          for n, h in sorted(holders.items())],
            "known": cards.known_names()}


class UiController(Controller):
    path = "/ui"
    tags = ["Dashboard"]
    include_in_schema = False

    @get("", summary="The dashboard page")
    async def page(self) -> Response[bytes]:
        return dashboard_page()

    @get("/static/{name:str}", summary="The dashboard's script and style sheet")
    async def asset(self, name: str) -> Response[bytes]:
        if name not in STATIC:
            return _error(404, f"no file {name}")
        return Response(static_file(name), media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache"})

    @get("/api/auth", summary="What the page must ask for, and which admin actions it may take")
    async def auth(self, request: Request[Any, Any, Any]) -> Response[Any]:
        rule = admin_rule(request)
        rule["key_ok"] = _read_problem(request) is None
        return _json(rule)

    @get("/api/live", summary="This node's live figures (agent-to-agent)")
    async def live(self, request: Request[Any, Any, Any]) -> Response[Any]:
        cluster = _cluster(request)
        problem = peer_signature_error(request, b"", cluster.secret, cluster.auth_mode,
                                       window_s=cluster.settings.auth_window_s,
                                       replay_guard=_replay_guard)
        if problem:
            return _error(401, problem)
        body = msgspec.json.encode(_own_figures(request))
        return Response(body, media_type="application/json",
                        headers=response_headers(cluster.secret, cluster.node_id, body,
                                                 dict(request.headers)))

    @get("/api/overview", summary="Cluster status, every node's live figures, the models")
    async def overview(self, request: Request[Any, Any, Any]) -> Response[Any]:
        refused = _read_problem(request)
        if refused:
            return refused
        cluster = _cluster(request)
        status = cluster.status()
        alive = {n["node_id"] for n in status["nodes"] if n["status"] in ("alive", "suspect")}
        peers = [p for p in cluster.peers() if p.node_id in alive and p.addresses]
        gathered = await asyncio.gather(*(_peer_figures(cluster, p) for p in peers))
        live = {cluster.node_id: _own_figures(request), **dict(gathered)}
        return _json({"status": status, "live": live, "models": _models(request),
                      "auth": admin_rule(request)})

    @post("/api/pull", summary="Pull a model into this node's store, streaming progress",
          status_code=200)
    async def pull(self, request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()
        refused = await _admin_problem(request, body)
        if refused:
            return refused
        try:
            wanted = json.loads(body or b"{}")
            name = str(wanted["name"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "send {\"name\": MODEL}")
        store = request.app.state["engine"].store
        return Stream(_pull_events(store, name, str(wanted.get("dtype") or "float32")),
                      media_type="application/x-ndjson")

    @delete("/api/models/{name:str}", summary="Remove a model from this node's store",
            status_code=200)
    async def remove(self, request: Request[Any, Any, Any], name: str) -> Response[Any]:
        refused = await _admin_problem(request, b"")
        if refused:
            return refused
        from agent.engine import ModelNotFound

        try:
            await asyncio.to_thread(request.app.state["engine"].store.remove, name)
        except (ModelNotFound, ValueError) as exc:
            return _error(404, f"no model {name} here: {exc}")
        return _json({"removed": name})

    @post("/api/doctor", summary="Run `flock doctor` on this node", status_code=200)
    async def doctor(self, request: Request[Any, Any, Any]) -> Response[Any]:
        refused = _read_problem(request)
        if refused:
            return refused
        return _json(await run_doctor(_cluster(request).settings))


async def _pull_events(store: Any, name: str, dtype: str) -> AsyncIterator[bytes]:
    """NDJSON lines: {"status": text}, {"completed": bytes, "total": bytes}, then {"done": name}
    or {"error": why}. The pull runs in a thread; its progress crosses over by a queue."""
    from agent.models.fetch import pull

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def put(item: dict[str, Any] | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            stored = pull(store, name, dtype=dtype, progress=lambda line: put({"status": line}),
                          on_bytes=lambda done, total: put({"completed": done, "total": total}))
            put({"done": stored.name})
        except Exception as exc:  # its reason is what the page shows
            put({"error": str(exc)})
        finally:
            put(None)

    worker = loop.run_in_executor(None, work)
    while (item := await queue.get()) is not None:
        yield msgspec.json.encode(item) + b"\n"
    await worker


def _local_host(host: str) -> str:
    """Where this node answers from this machine: loopback unless bound to one address."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def run_doctor(settings: Any) -> dict[str, Any]:
    """`flock doctor --json` against this node, in a subprocess (its MLX checks import MLX; the
    agent process never does)."""
    from agent.runtime.client import PACKAGE_ROOT

    command = [sys.executable, "-m", "agent", "doctor", "--json",
               "--url", f"http://{_local_host(settings.host)}:{settings.port}",
               "--state-dir", str(settings.state_dir), "--models-dir", str(settings.models_dir)]
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    if settings.api_keys:
        env["FLOCK_DOCTOR_KEY"] = settings.api_keys[0]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=str(PACKAGE_ROOT), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), DOCTOR_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        return {"error": f"flock doctor took longer than {DOCTOR_TIMEOUT_S:.0f} s"}
    try:
        return {"exit": process.returncode, **json.loads(out)}
    except ValueError:
        return {"exit": process.returncode, "error": err.decode(errors="replace")[-2000:]}
