"""Peer-to-peer shard transfer: a node fetches only the tensors of its own stage from a peer.

A pipeline stage needs its layers (plus the embedding or the head at the ends); a node that does
not have the model in its store gets exactly those tensors from a node that does, streamed as a
safetensors file built on the fly from the holder's files, together with the small files
(config, tokenizer). Nothing else crosses the network, and nothing is held whole in memory.
Shards live under `<models_dir>/.shards/`, apart from the store's complete models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.models import arch
from agent.models.arch import LayerRange, safetensor_files, stage_wants

# Files a runner needs besides the weights; served only from this list (no path traversal).
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
               "tokenizer.model")
CHUNK = 1 << 20


class ShardError(RuntimeError):
    """A shard could not be fetched or is malformed."""


@dataclass(frozen=True)
class TensorLocation:
    file: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offsets in `file`
    end: int


def _header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def tensor_index(model_dir: Path) -> dict[str, TensorLocation]:
    """Where every tensor of a model directory lives, from the safetensors headers alone."""
    index: dict[str, TensorLocation] = {}
    for path in safetensor_files(model_dir):
        header, base = _header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            index[name] = TensorLocation(path, entry["dtype"], list(entry["shape"]),
                                         base + start, base + end)
    return index


def stage_tensor_names(model_dir: Path, layers: LayerRange, *, embeds: bool,
                       projects: bool) -> list[str]:
    tied = arch.shape(arch.read_config(model_dir)).tied
    return sorted(name for name in tensor_index(model_dir)
                  if stage_wants(name, layers, embeds, projects, tied))


def safetensors_stream(index: dict[str, TensorLocation], names: list[str]) -> Iterator[bytes]:
    """A safetensors file holding exactly `names`, produced chunk by chunk."""
    missing = [n for n in names if n not in index]
    if missing:
        raise ShardError(f"unknown tensors: {', '.join(missing[:5])}")
    header: dict[str, dict] = {}
    offset = 0
    for name in names:
        loc = index[name]
        size = loc.end - loc.start
        header[name] = {"dtype": loc.dtype, "shape": loc.shape,
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep tensor data 8-byte aligned
    yield struct.pack("<Q", len(text)) + text
    for name in names:
        loc = index[name]
        with loc.file.open("rb") as f:
            f.seek(loc.start)
            left = loc.end - loc.start
            while left:
                block = f.read(min(CHUNK, left))
                if not block:
                    raise ShardError(f"{loc.file} ended inside tensor {name}")
                left -= len(block)
                yield block


def shard_dir(models_dir: Path, model: str, layers: LayerRange, *, embeds: bool,
              projects: bool) -> Path:
    tag = f"{layers.start}-{layers.stop}{'-e' if embeds else ''}{'-h' if projects else ''}"
    safe = hashlib.sha256(model.encode()).hexdigest()[:8]
    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in model)
    return models_dir / ".shards" / f"{name}-{safe}" / tag


def complete(directory: Path) -> bool:
    return (directory / "flock-shard.json").exists()


@dataclass(frozen=True)
class StageSelector:
    """Which tensors a stage needs: its layers, and whether it embeds and/or projects."""

    layer_start: int
    layer_stop: int
    embeds: bool
    projects: bool

    def names(self, model_dir: Path) -> list[str]:
        return stage_tensor_names(model_dir, LayerRange(self.layer_start, self.layer_stop),
                                  embeds=self.embeds, projects=self.projects)


def check_shard(staging: Path, selector: StageSelector) -> list[str]:
    """The shard is well-formed safetensors holding exactly what the stage needs."""
    path = staging / "model.safetensors"
    header, base = _header(path)
    header.pop("__metadata__", None)
    if sorted(header) != selector.names(staging):
        raise ShardError("the peer sent other tensors than the stage needs")
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if path.stat().st_size != base + end:
        raise ShardError("the shard is truncated")
    return sorted(header)


def install_shard(staging: Path, target: Path, selector: StageSelector, source: str) -> Path:
    """Move a fetched shard into place atomically (a half-fetched one never looks complete)."""
    names = check_shard(staging, selector)
    (staging / "flock-shard.json").write_text(json.dumps({"source": source, "tensors": names}))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


async def fetch_small_files(client: object, base: str, model: str, directory: Path,
                            sign: object) -> Path:
    """The config and tokenizer files of `model` from the peer at `base` into `directory`."""
    from urllib.parse import quote

    import httpx

    assert isinstance(client, httpx.AsyncClient)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"/cluster/models/{quote(model, safe='')}"
    for name in SMALL_FILES:
        path = f"{prefix}/files/{name}"
        response = await client.get(base + path, headers=sign("GET", path, b""))  # type: ignore[operator]
        if response.status_code == 200:
            (directory / name).write_bytes(response.content)
        elif response.status_code != 404:
            raise ShardError(f"{base}{path}: {response.status_code} {response.text[:200]}")
    if not (directory / "config.json").exists():
        raise ShardError(f"{base} has no config.json for {model}")
    return directory


async def fetch_shard(client: object, base: str, model: str, selector: StageSelector,
                      target: Path, sign: object) -> Path:
    """Fetch a stage's tensors (and the small files) of `model` from the peer at `base`.

    `client` is an httpx.AsyncClient; `sign(method, path, body) -> headers` authenticates each
    request with the cluster secret.
    """
    from urllib.parse import quote

    import httpx

    assert isinstance(client, httpx.AsyncClient)
    staging = target.parent / f".{target.name}.part-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    prefix = f"/cluster/models/{quote(model, safe='')}"
    try:
        await fetch_small_files(client, base, model, staging, sign)
        path = f"{prefix}/tensors"
        body = json.dumps(selector.__dict__).encode()
        headers = {"content-type": "application/json", **sign("POST", path, body)}  # type: ignore[operator]
        async with client.stream("POST", base + path, content=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise ShardError(f"{base}{path}: {response.status_code} {response.text[:200]}")
            with (staging / "model.safetensors").open("wb") as out:
                async for chunk in response.aiter_bytes(CHUNK):
                    out.write(chunk)
        return install_shard(staging, target, selector, base)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
