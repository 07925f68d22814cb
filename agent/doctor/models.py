"""Checks of the model store: every model's files intact against its manifest (flock.json).

By default by size and modification time (hashing a 100 GB store takes minutes): every weight
file the manifest names is there, the files add up to the size recorded at import, and none
was written after the import. With `deep`, each weight file's sha256 is compared too.
"""

from __future__ import annotations

from pathlib import Path

from agent.doctor.result import Check, fail, ok
from agent.models.store import MANIFEST, ModelStore, StoredModel, sha256_file

MTIME_SLACK_S = 5.0  # files are written just before the manifest's created_at is taken


def problems(model: StoredModel, *, deep: bool) -> list[str]:
    """What is wrong with one stored model's files (empty: intact)."""
    found = []
    files = {p.name: p for p in model.path.iterdir() if p.is_file() and p.name != MANIFEST}
    for name, expected in sorted(model.manifest.weights_sha256.items()):
        path = files.get(name)
        if path is None:
            found.append(f"{name} is missing")
            continue
        if path.stat().st_mtime > model.manifest.created_at + MTIME_SLACK_S:
            found.append(f"{name} was modified after the import")
        elif deep and sha256_file(path) != expected:
            found.append(f"{name} does not match its sha256")
    size = sum(_size(p) for p in files.values())
    if size != model.manifest.size_bytes:
        found.append(f"files add up to {size} bytes, {model.manifest.size_bytes} at import")
    return found


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_models(store: ModelStore, *, deep: bool = False) -> list[Check]:
    try:
        models = store.list()
    except OSError as exc:
        return [fail("models", f"cannot read the store at {store.root}: {exc}",
                     "check the permissions of --models-dir")]
    if not models:
        return [ok("models", f"no models in {store.root}")]
    checks = []
    how = "sha256" if deep else "size and mtime; --deep hashes"
    for model in models:
        found = problems(model, deep=deep)
        label = f"model {model.name}"
        if found:
            checks.append(fail(label, "; ".join(found),
                               f"flock pull {model.name} (or flock import FILE) again to "
                               "replace it"))
        else:
            checks.append(ok(label, f"intact ({how})"))
    return checks
