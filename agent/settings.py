"""Node settings: one source of truth, from flags > env FLOCK_* > flock.toml > defaults.

Nothing else in flock reads `os.environ` for configuration; the runner gets its settings passed
in explicitly by the agent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_PORT = 52415
DEFAULT_MODEL = "smollm2-135m"


def _default_home() -> Path:
    return Path.home() / ".flock"


def _default_models_dir() -> Path:
    return Path.home() / ".cache" / "flock" / "models"


class NodeSettings(BaseSettings):
    """Everything one node needs to know about itself."""

    model_config = SettingsConfigDict(
        env_prefix="FLOCK_",
        extra="forbid",
        validate_default=True,
    )

    # Where this node keeps its state (node id, logs, runner sockets) and its model store.
    state_dir: Path = Field(default_factory=_default_home)
    models_dir: Path = Field(default_factory=_default_models_dir)
    config_file: Path | None = None

    # HTTP
    host: str = "0.0.0.0"
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    ollama_port: int | None = Field(default=None, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    cors_origins: list[str] = Field(default_factory=list)
    # SIGTERM/SIGINT: requests in flight get this long to finish; shortly before it ends, those
    # still running are ended with a "server shutting down" error in their API's format.
    shutdown_grace_s: float = Field(default=30.0, gt=0)

    # What to serve when no cluster spec says otherwise.
    model: str | None = DEFAULT_MODEL
    dtype: Literal["auto", "keep", "float32", "float16", "bfloat16"] = "auto"

    # Runner behaviour
    max_batch: int = Field(default=16, ge=1, le=256)
    max_queue: int = Field(default=64, ge=0)
    prefill_chunk: int = Field(default=512, ge=16)
    # While other streams decode, a prefill slice is sized to take at most this many decode
    # steps' time (0: always `prefill_chunk` tokens).
    prefill_gap_steps: float = Field(default=6.0, ge=0)
    max_tokens_default: int = Field(default=2048, ge=1)
    memory_cap_bytes: int | None = Field(default=None, ge=0)
    # KV cache per runner; unset: what memory allows after the weights. The prefix cache keeps
    # finished conversations for reuse; unset: a quarter of the KV budget.
    kv_budget_bytes: int | None = Field(default=None, ge=0)
    prefix_cache_bytes: int | None = Field(default=None, ge=0)
    blas: Literal["auto", "off"] = "auto"
    blas_threads: int | None = Field(default=None, ge=1)
    # flock's fused attention kernels for Linux CPUs (agent.runtime.kernels); "off": MLX's own.
    kernels: Literal["auto", "off"] = "auto"
    compile_step: bool = True
    fuse_projections: bool = True
    # A pipeline keeps one micro-batch per stage in flight so every stage computes at once
    # (off: stop-and-wait, one step in the ring at a time).
    pipeline_microbatch: bool = True
    # Speculative decoding by prompt lookup: drafts from the prompt and the text so far, verified
    # several tokens a pass; it turns itself off per sequence where it does not pay. A
    # request's `prediction` (Predicted Outputs) still drafts when this is off.
    prompt_lookup: bool = True
    # A draft model (store name or path) for the default `model` on this node: it proposes
    # tokens the model verifies several a pass. It must share the model's tokenizer (checked
    # before the runner starts; a draft that does not is refused and the model served without).
    draft: str | None = None

    # Cluster. With no cluster file and discovery on, nodes of the same cluster name and secret
    # find each other on the LAN. With API keys and no secret, the secret is derived from the
    # first key (agent.cluster.auth.effective_secret); open mode (neither): admin endpoints answer
    # loopback only.
    cluster_file: Path | None = None  # cluster.toml (GitOps): watched, validated, distributed
    cluster_name: str = "flock"
    cluster_secret: str | None = None
    node_name: str | None = None  # defaults to the host name
    data_port_base: int = Field(default=52500, ge=1024, le=65000)  # runners' links: base + 4k
    discovery_enabled: bool = True
    discovery_interfaces: list[str] = Field(default_factory=list)  # names or CIDRs; [] = all up
    discovery_group: str = "239.77.52.41"
    discovery_port: int = Field(default=52416, ge=1, le=65535)
    discovery_interval_s: float = Field(default=1.0, gt=0)
    discovery_multicast: bool = True
    discovery_broadcast: bool = True
    suspect_after_missed: int = Field(default=3, ge=1)
    dead_after_missed: int = Field(default=8, ge=2)
    auth_window_s: float = Field(default=30.0, gt=0)
    peer_timeout_s: float = Field(default=5.0, gt=0)
    placement_wait_s: float = Field(default=120.0, gt=0)  # a request waits this long for a load

    # Observability
    metrics_enabled: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, _toml_path()))

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"


def _toml_path() -> Path | None:
    """flock.toml: $FLOCK_CONFIG_FILE, else <state_dir>/flock.toml when it exists."""
    explicit = os.environ.get("FLOCK_CONFIG_FILE")
    if explicit:
        return Path(explicit)
    state = os.environ.get("FLOCK_STATE_DIR")
    candidate = (Path(state) if state else _default_home()) / "flock.toml"
    return candidate if candidate.exists() else None


def load_settings(**overrides: Any) -> NodeSettings:
    """Settings with the given flag values on top (None means 'flag not given')."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return NodeSettings(**given)
