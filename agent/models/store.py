"""The local model store: one mlx-lm directory per model under `<root>/<name>/`, plus `flock.json`.

`flock.json` records where the model came from (and the sha256 of that file), what it is, and a
sha256 per weight file so `verify` can tell a damaged copy from a good one. A model appears in
the store whole or not at all: it is built in a staging directory under the store and renamed
into place while holding a per-name lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import re
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from agent.engine import ModelInfo, ModelNotFound
from agent.models import arch
from agent.models.files import replace_dir

MANIFEST = "flock.json"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_STAGING = ".staging"
_LOCKS = ".locks"


class InvalidModelName(ValueError):
    """A store name must be a plain lowercase file name: letters, digits, '.', '_', '-'."""


class IntegrityError(RuntimeError):
    """A stored weight file no longer matches the sha256 recorded when it was stored."""


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """The contents of `<root>/<name>/flock.json`."""

    name: str
    source: str  # "gguf:/path/file.gguf", "pypi:pkg==1.0/member", "hf:org/name"
    source_sha256: str | None  # of the file imported; None for multi-file hub snapshots
    architecture: str  # mlx-lm model_type
    parameters: int
    quantization: str  # "F32", "F16", "BF16", "Q4", "Q8"
    dtype: str  # how it was imported: "float32", "float16", "bfloat16", "keep", or "native"
    size_bytes: int
    context_length: int
    created_at: float  # unix seconds
    weights_sha256: dict[str, str]  # weight file name -> sha256
    format: int = 1


@dataclass(frozen=True)
class StoredModel:
    """A model in the store: its directory (what `mlx_lm.load` takes) and its manifest."""

    name: str
    path: Path
    manifest: Manifest

    @property
    def refusal(self) -> str | None:
        """Why nothing here can serve this model (its architecture), or None if it can.

        Listings show it so a model stored before it was refused, or by another flock
        version, is named as unservable instead of failing when asked for.
        """
        return arch.refusal_of_dir(self.path)


def normalize_name(name: str) -> str:
    """The store name for `name` (case-insensitive); raises InvalidModelName."""
    lowered = name.strip().lower()
    if not _NAME.fullmatch(lowered) or lowered in (".", ".."):
        raise InvalidModelName(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return lowered


def name_from_file(path: Path) -> str:
    """A store name derived from a file name: 'SmolLM2-135M.Q4_1.gguf' -> 'smollm2-135m.q4_1'."""
    stem = Path(path).name.lower()
    stem = stem.removesuffix(".gguf")
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")
    return normalize_name(cleaned[:128] or "model")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    # --- reading ------------------------------------------------------------------------------

    def list(self) -> list[StoredModel]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
                continue
            try:
                found.append(self._read(entry))
            except (OSError, msgspec.ValidationError, msgspec.DecodeError):
                continue  # a damaged manifest hides that model rather than the whole listing
        return found

    def get(self, name: str) -> StoredModel:
        try:
            key = normalize_name(name)
        except InvalidModelName:
            raise ModelNotFound(name) from None
        directory = self.root / key
        if not (directory / MANIFEST).is_file():
            raise ModelNotFound(name)
        try:
            return self._read(directory)
        except (OSError, msgspec.ValidationError, msgspec.DecodeError):
            raise ModelNotFound(name) from None

    def resolve(self, name_or_path: str | Path) -> Path:
        """The directory to load: a store name, or a path to any mlx-lm/HF model directory."""
        text = str(name_or_path)
        try:
            return self.get(text).path
        except ModelNotFound:
            pass
        path = Path(text).expanduser()
        if (path / "config.json").is_file():
            return path.resolve()
        raise ModelNotFound(text)

    def info(self, name: str) -> ModelInfo:
        model = self.get(name)
        m = model.manifest
        return ModelInfo(
            name=model.name,
            architecture=m.architecture,
            parameters=m.parameters,
            quantization=m.quantization,
            size_bytes=m.size_bytes,
            context_length=m.context_length,
            digest=_combined_digest(m.weights_sha256),
            modified_at=m.created_at,
            chat_template=_chat_template(model.path),
            **_serving(arch.read_config(model.path)),
        )

    def verify(self, name: str) -> None:
        """Re-hash the weight files; raises IntegrityError naming any that changed."""
        model = self.get(name)
        bad = []
        for file, expected in sorted(model.manifest.weights_sha256.items()):
            path = model.path / file
            if not path.is_file() or sha256_file(path) != expected:
                bad.append(file)
        if bad:
            raise IntegrityError(f"model '{model.name}': {', '.join(bad)} do not match the "
                                 "sha256 recorded at import; remove and import it again")

    # --- writing ------------------------------------------------------------------------------

    def import_gguf(
        self, path: Path, name: str | None = None, dtype: str = "float32",
        *, source: str | None = None,
    ) -> StoredModel:
        """Import a GGUF file (see `agent.models.gguf`) under `name`, replacing any model of
        that name. `source` overrides the recorded origin (default: the file's path)."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        key = normalize_name(name) if name is not None else name_from_file(path)
        digest = sha256_file(path)

        def build(directory: Path) -> None:
            # The converter reads the file with MLX: imported here, not by the control plane.
            from agent.models import gguf

            gguf.import_gguf(path, directory, dtype=dtype)

        return self.add(key, build, source=source or f"gguf:{path}", source_sha256=digest,
                        dtype=dtype)

    def add(
        self, name: str, build: Callable[[Path], None], *, source: str,
        source_sha256: str | None = None, dtype: str = "native",
    ) -> StoredModel:
        """Store the model that `build(directory)` writes into an empty `directory`.

        The result replaces any model of that name atomically; if `build` fails the store is
        as it was.
        """
        key = normalize_name(name)
        with self._locked(key):
            staging = self._staging(key)
            work = Path(tempfile.mkdtemp(prefix=f"{key}+", dir=staging))
            try:
                built = work / key
                built.mkdir()
                build(built)
                manifest = describe(built, name=key, source=source, source_sha256=source_sha256,
                                    dtype=dtype)
                (built / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
                built.chmod(0o755)
                replace_dir(built, self.root / key)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return self.get(key)

    def remove(self, name: str) -> None:
        key = self.get(name).name
        with self._locked(key):
            model = self.get(name)  # again: another process may have removed it meanwhile
            trash = Path(tempfile.mkdtemp(prefix=f"{key}+removed.", dir=self._staging(key)))
            # Rename first so the model vanishes at once, then delete at leisure.
            model.path.rename(trash / key)
            shutil.rmtree(trash, ignore_errors=True)

    # --- internals ----------------------------------------------------------------------------

    def _staging(self, key: str) -> Path:
        """The staging area, cleared of work that crashed processes left for `key`.

        Only call with `key`'s lock held: then no live process owns a `<key>+...` entry.
        """
        staging = self.root / _STAGING
        staging.mkdir(parents=True, exist_ok=True)
        for stale in staging.glob(f"{key}+*"):
            shutil.rmtree(stale, ignore_errors=True)
        return staging

    def _read(self, directory: Path) -> StoredModel:
        manifest = msgspec.json.decode((directory / MANIFEST).read_bytes(), type=Manifest)
        return StoredModel(name=directory.name, path=directory, manifest=manifest)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive lock per model name, across processes (flock on `.locks/<name>`)."""
        locks = self.root / _LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        with (locks / f"{key}.lock").open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --- describing an mlx-lm directory -------------------------------------------------------------


def info_from_dir(model_dir: Path, name: str) -> ModelInfo:
    """What the APIs show of a model directory outside the store (a path, a peer's shard)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    quant = arch.quantization(config)
    return ModelInfo(
        name=name,
        architecture=config.get("model_type", "unknown"),
        parameters=0,
        quantization=f"Q{quant.bits}" if quant else "F32",
        size_bytes=sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
        context_length=arch.context_length(config),
        digest="",
        modified_at=model_dir.stat().st_mtime,
        chat_template=_chat_template(model_dir),
        **_serving(config),
    )


def _serving(config: dict[str, Any]) -> dict[str, Any]:
    """ModelInfo's engine and refusal fields, from the architecture registry."""
    found = arch.architecture(config)
    return {"engine": found.engine or "", "refusal": arch.refusal(config)}


def describe(
    directory: Path, *, name: str, source: str, source_sha256: str | None, dtype: str
) -> Manifest:
    """The manifest of an mlx-lm/HF model directory, read from its config and weight headers."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    files = sorted(p for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    headers: dict[str, dict[str, Any]] = {}
    for file in files:
        headers.update(_safetensors_header(file))
    quant = config.get("quantization") or {}
    return Manifest(
        name=name,
        source=source,
        source_sha256=source_sha256,
        architecture=str(config.get("model_type", "unknown")),
        parameters=_count_parameters(headers, quant),
        quantization=_quantization_label(headers, quant),
        dtype=dtype,
        size_bytes=sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
        context_length=arch.context_length(config),
        created_at=time.time(),
        weights_sha256={p.name: sha256_file(p) for p in files},
    )


def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _count_parameters(headers: dict[str, dict[str, Any]], quant: dict[str, Any]) -> int:
    total = 0
    for tensor, info in headers.items():
        module, _, kind = tensor.rpartition(".")
        if kind in ("scales", "biases") and f"{module}.weight" in headers:
            continue  # quantization bookkeeping, not parameters
        shape = info["shape"]
        scales = headers.get(f"{module}.scales")
        if kind == "weight" and scales is not None:
            # A packed row holds scales-per-row * group_size weights.
            entry = quant.get(module) if isinstance(quant.get(module), dict) else quant
            group = int(entry.get("group_size", 64))
            shape = [*shape[:-1], scales["shape"][-1] * group]
        total += math.prod(shape)
    return total


def _quantization_label(headers: dict[str, dict[str, Any]], quant: dict[str, Any]) -> str:
    if quant.get("bits"):
        return f"Q{int(quant['bits'])}"
    # Safetensors names its dtypes the way listings want them: F32, F16, BF16.
    dtypes = Counter(info["dtype"] for name, info in headers.items() if name.endswith(".weight"))
    return dtypes.most_common(1)[0][0] if dtypes else "unknown"


def _combined_digest(weights: dict[str, str]) -> str:
    if len(weights) == 1:
        return next(iter(weights.values()))
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(weights.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _chat_template(directory: Path) -> str | None:
    from agent.models.tokenizer import default_chat_template

    return default_chat_template(directory)
