"""The model store: layout, manifest, name rules, integrity, and imports that race or fail."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from tokenizers import Tokenizer, pre_tokenizers

from agent.engine import ModelInfo, ModelNotFound
from agent.models.gguf import GGUFImportError
from agent.models.store import MANIFEST, IntegrityError, InvalidModelName, ModelStore

# The GGUF builders live with the importer's tests; the store only needs a valid file.
from tests.test_gguf_import import (
    CHAT_TEMPLATE,
    TINY,
    bpe_metadata,
    gguf_tensors,
    model_metadata,
    reference_model,
    trained_bpe,
    write_tiny_gguf,
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok: Tokenizer = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf"
    write_tiny_gguf(path, "llama", tok)
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def staging_leftovers(store: ModelStore) -> list[Path]:
    return [p for p in (store.root / ".staging").glob("*")] if store.root.exists() else []


def test_import_stores_a_loadable_model_with_its_manifest(
    store: ModelStore, tiny_gguf: Path
) -> None:
    stored = store.import_gguf(tiny_gguf, name="tiny")
    assert stored.path == store.root / "tiny"
    model, _ = load_model(stored.path)
    m = json.loads((stored.path / MANIFEST).read_text())
    assert m["name"] == "tiny"
    assert m["source"] == f"gguf:{tiny_gguf.resolve()}"
    assert m["source_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert m["architecture"] == "llama"
    assert m["parameters"] == sum(w.size for _, w in tree_flatten(model.parameters()))
    assert m["quantization"] == "F32"
    assert m["context_length"] == TINY["max_position_embeddings"]
    model_files = [p for p in stored.path.iterdir() if p.name != MANIFEST]
    assert m["size_bytes"] == sum(p.stat().st_size for p in model_files)
    assert m["weights_sha256"] == {
        "model.safetensors": hashlib.sha256((stored.path / "model.safetensors").read_bytes())
        .hexdigest()
    }
    assert [s.name for s in store.list()] == ["tiny"]
    assert staging_leftovers(store) == []


def test_name_defaults_to_the_sanitized_file_name(store: ModelStore, tiny_gguf: Path) -> None:
    assert store.import_gguf(tiny_gguf).name == "tiny-llama.f32"
    assert store.get("Tiny-Llama.F32").name == "tiny-llama.f32"  # names are case-insensitive


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden", "-x", "x" * 129, "na me",
                                 "..", "/abs", "c:\\x"])
def test_invalid_names_are_refused_before_anything_is_written(
    store: ModelStore, tiny_gguf: Path, bad: str
) -> None:
    with pytest.raises(InvalidModelName):
        store.import_gguf(tiny_gguf, name=bad)
    assert not store.root.exists() or store.list() == []
    assert not (store.root.parent / "evil").exists()


def test_unknown_or_malformed_names_are_model_not_found(store: ModelStore) -> None:
    for name in ("missing", "../etc", ""):
        with pytest.raises(ModelNotFound):
            store.get(name)
    assert store.list() == []


def test_resolve_takes_store_names_and_model_directories(
    store: ModelStore, tiny_gguf: Path, tmp_path: Path
) -> None:
    stored = store.import_gguf(tiny_gguf, name="tiny")
    assert store.resolve("tiny") == stored.path
    elsewhere = tmp_path / "hf-style"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    assert store.resolve(str(elsewhere)) == elsewhere.resolve()
    assert store.resolve(elsewhere) == elsewhere.resolve()
    with pytest.raises(ModelNotFound):
        store.resolve(str(tmp_path))  # a directory, but not a model
    with pytest.raises(ModelNotFound):
        store.resolve("nothing-here")


def test_info_describes_the_model_for_the_apis(store: ModelStore, tiny_gguf: Path) -> None:
    stored = store.import_gguf(tiny_gguf, name="tiny")
    info = store.info("tiny")
    assert isinstance(info, ModelInfo)
    assert (info.name, info.architecture, info.quantization) == ("tiny", "llama", "F32")
    assert info.parameters == stored.manifest.parameters
    assert info.digest == stored.manifest.weights_sha256["model.safetensors"]
    assert info.chat_template == CHAT_TEMPLATE
    assert info.context_length == 512
    assert info.modified_at == stored.manifest.created_at


def test_half_precision_import_is_labelled_f16(store: ModelStore, tiny_gguf: Path) -> None:
    stored = store.import_gguf(tiny_gguf, name="tiny16", dtype="float16")
    assert stored.manifest.quantization == "F16"
    assert stored.manifest.dtype == "float16"


def test_verify_detects_a_damaged_weight_file(store: ModelStore, tiny_gguf: Path) -> None:
    stored = store.import_gguf(tiny_gguf, name="tiny")
    store.verify("tiny")
    weights = stored.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        store.verify("tiny")
    weights.unlink()
    with pytest.raises(IntegrityError):
        store.verify("tiny")


def test_remove_deletes_the_model(store: ModelStore, tiny_gguf: Path) -> None:
    store.import_gguf(tiny_gguf, name="tiny")
    store.remove("tiny")
    assert store.list() == []
    assert not (store.root / "tiny").exists()
    with pytest.raises(ModelNotFound):
        store.remove("tiny")
    assert staging_leftovers(store) == []


def test_failed_import_keeps_the_previous_model(
    store: ModelStore, tiny_gguf: Path, tmp_path: Path
) -> None:
    before = store.import_gguf(tiny_gguf, name="tiny")
    tok = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
    bad = tmp_path / "bad.gguf"
    metadata = {**model_metadata("gptneox", TINY, 16), **bpe_metadata(tok, "gpt-2")}
    mx.save_gguf(str(bad), gguf_tensors(reference_model("llama", tok.get_vocab_size()), "llama"),
                 metadata)
    with pytest.raises(GGUFImportError):
        store.import_gguf(bad, name="tiny")
    assert store.get("tiny").manifest == before.manifest
    store.verify("tiny")
    assert staging_leftovers(store) == []


def test_concurrent_imports_of_one_name_leave_one_whole_model(
    store: ModelStore, tiny_gguf: Path
) -> None:
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from agent.models.store import ModelStore
        ModelStore(Path({str(store.root)!r})).import_gguf(
            Path({str(tiny_gguf)!r}), name="shared", dtype=sys.argv[1])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, dtype], cwd=Path.cwd())
             for dtype in ("float32", "float16", "bfloat16")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    stored = store.get("shared")
    store.verify("shared")  # the weights are the ones the manifest describes
    label = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[stored.manifest.dtype]
    assert stored.manifest.quantization == label
    load_model(stored.path)
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".")] == ["shared"]
    assert staging_leftovers(store) == []


def test_listing_names_models_nothing_here_can_serve(store: ModelStore) -> None:
    def build(architecture: str) -> object:
        def write(directory: Path) -> None:
            config = {"model_type": architecture, "hidden_size": 64, "num_hidden_layers": 2,
                      "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 100}
            (directory / "config.json").write_text(json.dumps(config))
            mx.save_safetensors(str(directory / "model.safetensors"),
                                {"model.norm.weight": mx.zeros((64,))})
        return write

    store.add("odd", build("frobnicator"), source="test")  # type: ignore[arg-type]
    store.add("fine", build("llama"), source="test")  # type: ignore[arg-type]
    refusals = {m.name: m.refusal for m in store.list()}
    assert refusals["fine"] is None
    assert refusals["odd"] is not None and "'frobnicator'" in refusals["odd"]
    assert "llama, mistral, qwen2, qwen3" in refusals["odd"]
