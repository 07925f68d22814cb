"""`flock doctor`: gather the facts (this machine, the node at --url, its peers), run every check,
print one line per check (or JSON) and exit non-zero when one failed.

What takes time runs side by side: the MLX probe (a subprocess) starts first, peers are probed
from threads while the local checks run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from agent import sysinfo
from agent.doctor import local, macos, network, peers
from agent.doctor.models import check_models
from agent.doctor.result import Check, exit_code, format_lines, warn


def _settings(args: argparse.Namespace) -> Any:
    from urllib.parse import urlsplit

    from agent.settings import load_settings

    port = args.port or (urlsplit(args.url).port if args.url else None)
    return load_settings(state_dir=args.state_dir, models_dir=args.models_dir, port=port,
                         data_port_base=args.data_port,
                         discovery_interfaces=args.discovery_interface or None,
                         api_keys=[args.api_key] if args.api_key else None)


def _secret(settings: Any, cluster_file: Path | None) -> tuple[str | None, str]:
    from agent.cluster.auth import auth_mode, effective_secret

    spec = None
    if cluster_file is not None:
        from agent.spec import cluster_secret, load_spec

        spec = load_spec(cluster_file)
        settings = settings.model_copy(update={
            "cluster_secret": settings.cluster_secret or cluster_secret(spec, cluster_file)})
    return effective_secret(settings, spec), auth_mode(settings, spec)


def _key(settings: Any) -> str | None:
    return os.environ.get("FLOCK_DOCTOR_KEY") or (settings.api_keys[0] if settings.api_keys
                                                  else None)


def fetch_status(url: str, key: str | None) -> tuple[dict[str, Any] | None, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/cluster", headers=headers, timeout=3,
                             trust_env=False)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return None, f"{response.status_code} {response.text[:160]}"
    return response.json(), ""


def peer_mlx_version(address: str, port: int, secret: str | None) -> str | None:
    from agent.cluster.peers import base_url, signed_headers

    path = "/ui/api/live"
    try:
        response = httpx.get(base_url(address, port) + path, timeout=2, trust_env=False,
                             headers=signed_headers(secret, "flock-doctor", "GET", path, b""))
        return response.json().get("versions", {}).get("mlx") if response.status_code == 200 \
            else None
    except (httpx.HTTPError, ValueError):
        return None


def largest_here(status: dict[str, Any] | None, store: Any) -> tuple[str, int] | None:
    """The model with the most bytes on this node: its share of each placement that uses this
    node (status known), else the largest stored model."""
    sizes: dict[str, int] = {}
    for model in store.list():
        sizes[model.name] = model.manifest.size_bytes
    if status is None or not status.get("placements"):
        return max(sizes.items(), key=lambda kv: kv[1]) if sizes else None
    me = status["node_id"]
    best: tuple[str, int] | None = None
    for placement in status["placements"]:
        total = max((s["layer_stop"] for s in placement["stages"]), default=0) or 1
        share = sum((s["layer_stop"] - s["layer_start"]) / total / len(s["nodes"])
                    for s in placement["stages"] if me in s["nodes"])
        size = int(sizes.get(placement["model"], 0) * share)
        if share and (best is None or size > best[1]):
            best = (placement["model"], size)
    return best


def gather_and_check(args: argparse.Namespace, probe: Any = None) -> list[Check]:
    """`probe`: the MLX probe process, when the caller started it already."""
    from agent.cluster.interfaces import list_local_addresses, select_addresses
    from agent.models.store import ModelStore

    settings = _settings(args)
    secret, mode = _secret(settings, args.cluster)
    if probe is None:
        probe = local.start_probe(str(settings.state_dir))
    url = args.url or f"http://127.0.0.1:{settings.port}"
    status, why = fetch_status(url, _key(settings))
    others = [n for n in (status or {}).get("nodes", []) if n.get("status") != "self"]
    pool = ThreadPoolExecutor(max(4, 2 * len(others)))
    probes = [pool.submit(peers.probe_peer, n["name"], (n.get("addresses") or ["?"])[0],
                          n["api_port"], n.get("data_port", 52500), secret) for n in others]
    versions = {n["name"]: pool.submit(peer_mlx_version, (n.get("addresses") or ["?"])[0],
                                       n["api_port"], secret) for n in others}
    checks = [local.check_python(sys.version_info)]
    store = ModelStore(settings.models_dir)
    placed_here = bool(status and status.get("placements"))
    checks.append(local.check_memory(sysinfo.total_memory_bytes(),
                                     sysinfo.available_memory_bytes(), largest_here(status, store),
                                     placed=placed_here))
    store_dir = settings.models_dir if settings.models_dir.exists() else Path.home()
    store_bytes = sum(m.manifest.size_bytes for m in store.list())
    checks.append(local.check_disk(shutil.disk_usage(store_dir).free, store_bytes,
                                   str(store_dir)))
    if status is None:
        checks.append(warn("node", f"no flock node answers at {url} ({why})",
                           "start it (flock run) or pass --url; peer checks are skipped"))
    facts = network.gather_ports(settings.port, settings.discovery_port, settings.data_port_base)
    checks += network.check_ports(facts, api_answers=status is not None)
    if settings.discovery_enabled:
        addresses = select_addresses(list_local_addresses(), settings.discovery_interfaces)
        results = dict(zip([a.address for a in addresses],
                           pool.map(lambda a: network.multicast_roundtrip(
                               a.address, settings.discovery_group, settings.discovery_port),
                               addresses), strict=True))
        checks += network.check_multicast(results, settings.discovery_group,
                                          settings.discovery_port)
    data_range = (settings.data_port_base, settings.data_port_base + 15)
    if sys.platform == "darwin":
        firewall = macos.SOCKETFILTERFW
        checks.append(macos.check_app_firewall(macos.run([firewall, "--getglobalstate"]),
                                               macos.run([firewall, "--getblockall"]),
                                               sys.executable))
        checks.append(macos.check_wired_limit(macos.run(["sysctl", "iogpu.wired_limit_mb"]),
                                              sysinfo.total_memory_bytes(),
                                              largest_here(status, store)))
    else:
        iptables, nft = network.read_firewall()
        checks.append(network.check_linux_firewall(iptables, nft,
                                                   discovery_port=settings.discovery_port,
                                                   data_ports=data_range,
                                                   api_port=settings.port))
    for peer_probe in probes:
        fact = peer_probe.result()
        checks += [peers.check_reachable(fact), peers.check_clock(fact, settings.auth_window_s),
                   peers.check_secret(fact, mode)]
    checks += check_models(store, deep=args.deep)
    mlx = local.finish_probe(probe)
    cluster_mlx = {name: v for name, future in versions.items() if (v := future.result())}
    checks.insert(1, local.check_mlx(mlx, sys.platform, cluster_mlx))
    checks.insert(2, local.check_blas(sys.platform if sys.platform != "darwin" else "darwin",
                                      mlx))
    pool.shutdown(wait=False)
    return checks


def main(args: argparse.Namespace, probe: Any = None) -> int:
    checks = gather_and_check(args, probe)
    if args.json:
        print(json.dumps({"platform": f"{sys.platform}-{platform.machine()}",
                          "checks": [c.as_dict() for c in checks],
                          "failed": exit_code(checks) != 0}, indent=2))
    else:
        print("\n".join(format_lines(checks)))
    return exit_code(checks)
