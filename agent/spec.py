"""The cluster spec (`cluster.toml`): what the cluster should run, as a validated pydantic model.

Editing the file is a deploy: agents load it with `load_spec`, report every problem with
`validate_spec_file`, identify it by `spec_hash` and hand it around as a `VersionedSpec` whose
generation only grows. `spec_from_observed` writes a running cluster back out as a spec.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.settings import DEFAULT_PORT

Strategy = Literal["auto", "pipeline", "tensor", "hybrid"]

# Binary and decimal units a memory cap may be written in ("12GiB", "500MB", "1.5 GB").
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# host, host:port, [v6], [v6]:port; a bare v6 address (two or more colons) without a port.
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^\s:\[\]]+))(?::(?P<port>\d+))?$")


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a size string such as "12GiB", "500MB" or "1.5 GB"."""
    if isinstance(value, bool):
        raise ValueError("expected a byte count or a size such as '12GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"'{value}' is not a size (use bytes or e.g. '12GiB', '500MB')")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(value: int) -> int | str:
    """The shortest exact binary-unit spelling ("12GiB"), or the int when none is exact."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterSection(_Section):
    """`[cluster]`: who the cluster is and where its API listens."""

    name: str = Field(default="flock", min_length=1)
    secret: str | None = Field(default=None, min_length=1)
    # Relative paths are relative to the spec file (see `cluster_secret`).
    secret_file: str | None = Field(default=None, min_length=1)
    api_port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)


class NodeEntry(_Section):
    """`[[nodes]]`: a static node (reachable where multicast is not), its labels and memory cap."""

    name: str = Field(min_length=1)
    address: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    memory_cap: int | None = None  # bytes; the file may say "12GiB"

    @field_validator("address")
    @classmethod
    def _address_is_host_or_host_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        bare_v6 = value.count(":") >= 2 and "[" not in value
        match = _ADDRESS.match(value)
        if not bare_v6 and match is None:
            raise ValueError(f"'{value}' is not host, host:port or [ipv6]:port")
        port = match.group("port") if match else None
        if port is not None and not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
        return value

    @field_validator("memory_cap", mode="before")
    @classmethod
    def _memory_cap_bytes(cls, value: Any) -> Any:
        if value is None or not isinstance(value, int | str):
            return value
        return parse_bytes(value)


def _replicas(value: Any) -> int | str:
    """A replica count: a positive integer, or "auto" (one per node the model fits on)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError('must be a positive integer or "auto"')
    return value


# One error for a bad value (a plain union would report one per member).
Replicas = Annotated[int | Literal["auto"], PlainValidator(_replicas)]


class ModelEntry(_Section):
    """`[[models]]`: one desired model, `replicas` instances of it, and how to place them."""

    model: str = Field(min_length=1)  # store name, local path or hub id
    # How many instances serve the model, sharing its requests; "auto": one on each node where
    # the model fits with headroom. Several may share a (pinned) node where memory allows.
    replicas: Replicas = 1
    # Scale on load: up to `max_replicas` instances while requests keep waiting for a batch
    # slot or KV room (queue wait above `scale_up_wait_s` for `scale_up_after_s`); an added
    # replica with no request for `keep_alive` seconds is drained and removed. Never fewer
    # than `replicas`. Unset: no scaling.
    max_replicas: PositiveInt | None = None
    scale_up_wait_s: PositiveFloat = 2.0
    scale_up_after_s: PositiveFloat = 10.0
    keep_alive: PositiveFloat = 300.0
    strategy: Strategy = "auto"
    nodes: list[str] | None = None  # pinned node names (or ids), in stage order
    labels: dict[str, str] | None = None  # pin to nodes carrying all these labels
    # Per pinned node layer counts (pipeline). Their sum must equal the model's layers; that is
    # checked at placement time, when the model's shape is known.
    layers: list[PositiveInt] | None = None
    context_length: PositiveInt | None = None
    kv_bits: Literal[4, 8] | None = None
    # What the runners load: "keep" serves the checkpoint's quantization as stored, a float
    # name dequantizes/casts to it, "auto" picks (see cluster/shape.serving_dtype); unset: the
    # node's `dtype` setting.
    dtype: Literal["auto", "keep", "float32", "float16", "bfloat16"] | None = None
    # Speculative decoding by prompt lookup for this model; unset: the node's `prompt_lookup`.
    prompt_lookup: bool | None = None
    # A draft model for speculative decoding: a small model with the same tokenizer (vocabulary
    # and special tokens, checked here when both are visible, else before the runner starts),
    # loaded beside the model's head.
    draft: str | None = Field(default=None, min_length=1)
    # Where the draft runs (a node name or id): a draft runner there answers the head over a
    # link. Unset: in the head runner when its node has the memory, else on a node that has.
    draft_node: str | None = Field(default=None, min_length=1)


class SpecError(BaseModel):
    """One problem in a spec file, at a key path such as `models[1].strategy`."""

    model_config = ConfigDict(frozen=True)

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.path or "(file)"
        if self.line is not None:
            where += f" (line {self.line}, column {self.column})"
        return f"{where}: {self.message}"


class ClusterSpec(_Section):
    """The whole `cluster.toml`."""

    cluster: ClusterSection = Field(default_factory=ClusterSection)
    nodes: list[NodeEntry] = Field(default_factory=list)
    models: list[ModelEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSpec:
        problems = relation_errors(self.model_dump())
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        return self

    def without_secret(self) -> ClusterSpec:
        """The spec as it may travel between nodes: the secret itself never does."""
        return self.model_copy(update={"cluster": self.cluster.model_copy(update={"secret": None})})


def relation_errors(data: Any) -> list[SpecError]:
    """Errors between keys (not of one key's value), from raw or dumped spec data.

    Tolerates values of the wrong type (those are reported by field validation), so that
    `validate_spec_file` reports these even when other parts of the file are broken.
    """
    errors: list[SpecError] = []
    if not isinstance(data, dict):
        return errors
    cluster = data.get("cluster")
    if isinstance(cluster, dict) and cluster.get("secret") and cluster.get("secret_file"):
        errors.append(SpecError(path="cluster.secret_file",
                                message="set either secret or secret_file, not both"))
    seen: dict[str, int] = {}
    for i, node in enumerate(_list(data.get("nodes"))):
        name = node.get("name") if isinstance(node, dict) else None
        if isinstance(name, str):
            if name in seen:
                errors.append(SpecError(path=f"nodes[{i}].name",
                                        message=f"duplicate node name '{name}' "
                                                f"(also nodes[{seen[name]}])"))
            seen.setdefault(name, i)
    for i, entry in enumerate(_list(data.get("models"))):
        if isinstance(entry, dict):
            errors.extend(_model_entry_errors(entry, f"models[{i}]"))
    return errors


def _model_entry_errors(entry: dict[str, Any], at: str) -> list[SpecError]:
    errors: list[SpecError] = []
    nodes, labels, layers = entry.get("nodes"), entry.get("labels"), entry.get("layers")
    strategy, replicas = entry.get("strategy", "auto"), entry.get("replicas", 1)
    if nodes is not None and labels is not None:
        errors.append(SpecError(path=f"{at}.labels", message="pin by nodes or by labels, not both"))
    if isinstance(nodes, list):
        if not nodes:
            errors.append(SpecError(path=f"{at}.nodes", message="must name at least one node"))
        duplicates = sorted({n for n in nodes if isinstance(n, str) and nodes.count(n) > 1})
        if duplicates:
            errors.append(SpecError(path=f"{at}.nodes",
                                    message=f"names a node twice: {', '.join(duplicates)}"))
        if duplicates and (replicas == "auto" or (isinstance(replicas, int) and replicas > 1)):
            # Replicas sharing pinned nodes are fine (memory is checked at placement); a pin
            # list that names a node twice cannot be placed even once.
            errors.append(SpecError(path=f"{at}.replicas",
                                    message="replicas > 1 need pinned nodes that name each node "
                                            "once"))
    if entry.get("draft_node") is not None and entry.get("draft") is None:
        errors.append(SpecError(path=f"{at}.draft_node",
                                message="names where the draft runs: set draft too"))
    max_replicas = entry.get("max_replicas")
    if isinstance(max_replicas, int) and isinstance(replicas, int) and max_replicas < replicas:
        errors.append(SpecError(path=f"{at}.max_replicas",
                                message=f"is {max_replicas}, below replicas = {replicas}"))
    if max_replicas is not None and replicas == "auto":
        errors.append(SpecError(path=f"{at}.max_replicas",
                                message='scale on load needs a number of replicas, not "auto"'))
    if layers is not None:
        if nodes is None:
            errors.append(SpecError(path=f"{at}.layers",
                                    message="per-node layer counts need pinned `nodes`"))
        elif isinstance(layers, list) and isinstance(nodes, list) and len(layers) != len(nodes):
            errors.append(SpecError(path=f"{at}.layers",
                                    message=f"has {len(layers)} counts for {len(nodes)} "
                                            "pinned nodes"))
        if strategy in ("tensor", "hybrid"):
            errors.append(SpecError(path=f"{at}.layers",
                                    message=f"per-node layer counts are for pipeline splits, "
                                            f"not strategy '{strategy}'"))
    return errors


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# --- reading, writing, identity -------------------------------------------------------------


class SpecFileError(ValueError):
    """A spec file that cannot be used; `errors` lists every problem found."""

    def __init__(self, path: Path, errors: list[SpecError]) -> None:
        self.errors = errors
        super().__init__(f"{path}: " + "; ".join(str(e) for e in errors))


def load_spec(path: Path) -> ClusterSpec:
    """Read and validate a cluster.toml; raises SpecFileError listing every problem."""
    spec, errors = _read(Path(path))
    if spec is None:
        raise SpecFileError(Path(path), errors)
    return spec


def validate_spec_file(path: Path, models_dir: Path | None = None) -> list[SpecError]:
    """Every problem in a spec file (empty when it is valid), TOML syntax errors included.

    Models this machine can see (a path beside the spec, or a name in `models_dir`'s store)
    are checked against the architecture registry too.
    """
    path = Path(path)
    spec, errors = _read(path)
    if spec is not None:
        errors.extend(_file_reference_errors(spec, path))
        errors.extend(model_errors(spec, lambda name: _visible_model(name, path.parent,
                                                                     models_dir)))
    return errors


def model_errors(spec: ClusterSpec,
                 resolve: Callable[[str], Path | None]) -> list[SpecError]:
    """`[[models]]` entries whose architecture (or strategy) nothing here can run.

    `resolve(model)` is the model's directory, or None where this process cannot see it (a
    model only a peer holds is checked at placement instead).
    """
    from agent.models import arch

    errors: list[SpecError] = []
    for i, entry in enumerate(spec.models):
        directory = resolve(entry.model)
        if directory is None:
            continue
        try:
            config = arch.read_config(directory)
        except (OSError, ValueError) as exc:
            errors.append(SpecError(path=f"models[{i}].model",
                                    message=f"cannot read {directory}/config.json: {exc}"))
            continue
        ranks = len(entry.nodes) if entry.nodes and entry.strategy == "tensor" else 1
        reason = arch.refusal(config, None if entry.strategy == "auto" else entry.strategy,
                              ranks)
        if reason is not None:
            key = "model" if arch.refusal(config) is not None else "strategy"
            errors.append(SpecError(path=f"models[{i}].{key}", message=reason))
    errors.extend(draft_errors(spec, resolve))
    return errors


def draft_errors(spec: ClusterSpec, resolve: Callable[[str], Path | None]) -> list[SpecError]:
    """`[[models]]` drafts that cannot draft for their model, where this process sees both
    (elsewhere the node running the head checks before it starts the runner)."""
    errors: list[SpecError] = []
    for i, entry in enumerate(spec.models):
        if entry.draft is None:
            continue
        target = resolve(entry.model)
        problem = draft_problem(resolve(entry.draft), target) if target is not None else None
        if problem is not None:
            errors.append(SpecError(path=f"models[{i}].draft", message=problem))
    return errors


def draft_problem(draft_dir: Path | None, target_dir: Path) -> str | None:
    """Why the model at `draft_dir` cannot draft for the one at `target_dir` (its tokenizer
    differs, or flock's decoder cannot run it); None when it can or is not visible here."""
    from agent.models import arch
    from agent.models.draft_check import check_draft_model

    if draft_dir is None:
        return None
    try:
        found = arch.architecture(arch.read_config(draft_dir))
        if found.engine != "flock":
            return (f"the draft model {draft_dir.name} is a {found.engine or 'unknown'} "
                    "architecture; a draft runs on flock's decoder")
        check_draft_model(draft_dir, target_dir)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def _visible_model(name: str, base: Path, models_dir: Path | None) -> Path | None:
    if models_dir is not None:
        stored = Path(models_dir).expanduser() / name.strip().lower()
        if (stored / "config.json").is_file() and (stored / "flock.json").is_file():
            return stored
    candidate = _resolve(base, name)
    return candidate if (candidate / "config.json").is_file() else None


def parse_spec(text: str) -> tuple[ClusterSpec | None, list[SpecError]]:
    """A spec from TOML text, or None and every error."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_syntax_error(exc)]
    return _validated(raw)


def _read(path: Path) -> tuple[ClusterSpec | None, list[SpecError]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [SpecError(path="", message=f"cannot read {path}: {exc.strerror or exc}")]
    except UnicodeDecodeError as exc:
        return None, [SpecError(path="", message=f"not UTF-8 text: {exc.reason}")]
    return parse_spec(text)


def _syntax_error(exc: tomllib.TOMLDecodeError) -> SpecError:
    # Python 3.11's TOMLDecodeError only carries the position inside its message.
    message = str(exc)
    match = re.search(r"\(at line (\d+), column (\d+)\)", message)
    if match is None:
        return SpecError(path="", message=f"TOML syntax: {message}")
    short = message[: match.start()].strip()
    return SpecError(path="", message=f"TOML syntax: {short}",
                     line=int(match.group(1)), column=int(match.group(2)))


def _validated(raw: dict[str, Any]) -> tuple[ClusterSpec | None, list[SpecError]]:
    try:
        return ClusterSpec.model_validate(raw), []
    except ValidationError as exc:
        errors = [_field_error(e) for e in exc.errors() if e["loc"]]
    # Relations between keys come from one pass over the raw data, so they are reported even
    # where pydantic stopped at a bad value (its model validator then never runs).
    errors.extend(relation_errors(raw))
    return None, _unique(errors)


def _field_error(error: Any) -> SpecError:
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "literal_error":
        message = f"got {error['input']!r}; {message[0].lower()}{message[1:]}"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return SpecError(path=path, message=message)


def _unique(errors: Iterable[SpecError]) -> list[SpecError]:
    seen: set[tuple[str, str]] = set()
    out: list[SpecError] = []
    for error in errors:
        if (error.path, error.message) not in seen:
            seen.add((error.path, error.message))
            out.append(error)
    return out


def _file_reference_errors(spec: ClusterSpec, path: Path) -> list[SpecError]:
    secret_file = spec.cluster.secret_file
    if secret_file is not None and not _resolve(path.parent, secret_file).is_file():
        return [SpecError(path="cluster.secret_file",
                          message=f"no such file: {_resolve(path.parent, secret_file)}")]
    return []


def _resolve(base: Path, name: str) -> Path:
    candidate = Path(name).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def cluster_secret(spec: ClusterSpec, spec_path: Path) -> str | None:
    """The cluster secret: inline, or read from secret_file (relative to the spec file)."""
    if spec.cluster.secret is not None:
        return spec.cluster.secret
    if spec.cluster.secret_file is None:
        return None
    return _resolve(Path(spec_path).parent, spec.cluster.secret_file).read_text().strip()


def dump_spec(spec: ClusterSpec) -> str:
    """TOML for a spec; `parse_spec(dump_spec(s))` gives `s` back. Defaults are left out."""
    data = spec.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
    for node in data.get("nodes", []):
        if "memory_cap" in node:
            node["memory_cap"] = format_bytes(node["memory_cap"])
    return tomli_w.dumps(data)


def spec_hash(spec: ClusterSpec) -> str:
    """Content hash of the spec's canonical form: same for any key order, formatting or spelling
    of a value ("12GiB" or its bytes). The secret is left out, so a hash never reveals it."""
    canonical = spec.without_secret().model_dump(mode="json")
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


class VersionedSpec(BaseModel):
    """A spec as the leader distributes it: a generation that only grows, and its hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int = Field(ge=0)
    hash: str
    spec: ClusterSpec

    @model_validator(mode="after")
    def _hash_matches(self) -> VersionedSpec:
        if self.hash != spec_hash(self.spec):
            raise ValueError("hash does not match the spec's content")
        return self

    @classmethod
    def first(cls, spec: ClusterSpec) -> VersionedSpec:
        return cls(generation=1, hash=spec_hash(spec), spec=spec.without_secret())

    def succeeded_by(self, spec: ClusterSpec) -> VersionedSpec:
        """The version for an accepted spec: this one if the content is unchanged, else next."""
        if spec_hash(spec) == self.hash:
            return self
        return VersionedSpec(generation=self.generation + 1, hash=spec_hash(spec),
                             spec=spec.without_secret())

    def newer_than(self, other: VersionedSpec | None) -> bool:
        """Whether a node holding `other` should take this one.

        Higher generation wins. Two different specs with the same generation (accepted by two
        leaders during a partition) conflict; the larger hash wins so that every node picks the
        same one, and status shows the conflict until a new generation settles it.
        """
        if other is None:
            return True
        if self.generation != other.generation:
            return self.generation > other.generation
        return self.hash > other.hash

    def conflicts_with(self, other: VersionedSpec) -> bool:
        return self.generation == other.generation and self.hash != other.hash


# --- export -------------------------------------------------------------------------------
