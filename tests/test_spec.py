"""cluster.toml: schema, every error with its key path, round trips, hashes, generations, export."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cluster.export import spec_from_observed
from agent.cluster.placement import place
from agent.cluster.state import NodeProfile
from agent.spec import (
    ClusterSection,
    ClusterSpec,
    ModelEntry,
    NodeEntry,
    SpecFileError,
    VersionedSpec,
    cluster_secret,
    dump_spec,
    load_spec,
    parse_bytes,
    parse_spec,
    spec_hash,
    validate_spec_file,
)
from tests.test_placement import SMOLLM2, node

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "cluster.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_by_path(path: Path) -> dict[str, str]:
    return {e.path: e.message for e in validate_spec_file(path)}


def test_the_example_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"single-node.toml", "pipeline-3node.toml", "tensor-3node.toml",
            "pinned.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_validates_and_round_trips(path: Path) -> None:
    assert validate_spec_file(path) == []
    spec = load_spec(path)
    again, errors = parse_spec(dump_spec(spec))
    assert errors == [] and again == spec


def test_memory_caps_read_as_bytes() -> None:
    assert parse_bytes("12GiB") == 12 * (1 << 30)
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes("1.5 GiB") == 3 * (1 << 29)
    assert parse_bytes(4096) == 4096
    with pytest.raises(ValueError):
        parse_bytes("12 parsecs")
    spec, _ = parse_spec('[[nodes]]\nname = "a"\nmemory_cap = "2GiB"\n')
    assert spec is not None and spec.nodes[0].memory_cap == 2 * (1 << 30)


def test_validation_reports_every_error_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, """
[cluster]
name = "lab"
secret = "s"
secret_file = "s.txt"
api_port = 70000
colour = "blue"

[[nodes]]
name = "a"
address = "10.0.0.1:99999"
memory_cap = "lots"

[[nodes]]
name = "a"

[[models]]
model = "smollm2-135m"

[[models]]
model = "smollm2-135m"
strategy = "fastest"
replicas = 0
nodes = ["a", "b"]
labels = { pool = "x" }
layers = [10, 10, 10]
kv_bits = 3
""")
    errors = errors_by_path(path)
    assert set(errors) == {
        "cluster.api_port", "cluster.colour", "cluster.secret_file",
        "nodes[0].address", "nodes[0].memory_cap", "nodes[1].name",
        "models[1].strategy", "models[1].replicas", "models[1].kv_bits",
        "models[1].labels", "models[1].layers",
    }
    assert errors["cluster.colour"] == "unknown key"
    assert "fastest" in errors["models[1].strategy"]
    assert "duplicate node name 'a'" in errors["nodes[1].name"]
    assert errors["models[1].layers"] == "has 3 counts for 2 pinned nodes"
    assert "not both" in errors["cluster.secret_file"]


def test_toml_syntax_errors_carry_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[cluster]\nname = "lab"\napi_port = = 1\n')
    [error] = validate_spec_file(path)
    assert error.line == 3 and error.column is not None
    assert error.message.startswith("TOML syntax")
    with pytest.raises(SpecFileError) as caught:
        load_spec(path)
    assert caught.value.errors == [error]


def test_layer_counts_need_pinned_nodes_and_a_pipeline(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[models]]
model = "m"
layers = [15, 15]

[[models]]
model = "m"
strategy = "tensor"
nodes = ["a", "b"]
layers = [15, 15]

[[models]]
model = "m"
nodes = ["a", "a"]
replicas = 2
""")
    errors = errors_by_path(path)
    assert "need pinned `nodes`" in errors["models[0].layers"]
    assert "not strategy 'tensor'" in errors["models[1].layers"]
    assert errors["models[2].nodes"] == "names a node twice: a"
    assert "replicas > 1" in errors["models[2].replicas"]


def test_secret_file_is_read_relative_to_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "cluster.secret").write_text("hunter2\n")
    path = write(tmp_path / "conf", '[cluster]\nsecret_file = "cluster.secret"\n')
    assert validate_spec_file(path) == []
    assert cluster_secret(load_spec(path), path) == "hunter2"
    missing = write(tmp_path, '[cluster]\nsecret_file = "nope.secret"\n')
    assert "no such file" in errors_by_path(missing)["cluster.secret_file"]


def test_an_unreadable_file_is_one_error(tmp_path: Path) -> None:
    [error] = validate_spec_file(tmp_path / "absent.toml")
    assert "cannot read" in error.message


def test_spec_hash_ignores_key_order_formatting_spelling_and_secret() -> None:
    a, _ = parse_spec('[cluster]\nname = "x"\napi_port = 1234\n\n[[nodes]]\nname = "n"\n'
                      'memory_cap = "1GiB"\n')
    b, _ = parse_spec('nodes = [{ memory_cap = 1073741824, name = "n" }]\n'
                      '[cluster]\napi_port=1234\nname="x"\nsecret = "s"\n')
    assert a is not None and b is not None
    assert spec_hash(a) == spec_hash(b)
    c = a.model_copy(update={"cluster": ClusterSection(name="y", api_port=1234)})
    assert spec_hash(c) != spec_hash(a)


def test_generations_grow_only_when_the_content_changes() -> None:
    one = VersionedSpec.first(ClusterSpec(models=[ModelEntry(model="m")]))
    same = one.succeeded_by(ClusterSpec(models=[ModelEntry(model="m")]))
    assert same == one
    two = one.succeeded_by(ClusterSpec(models=[ModelEntry(model="m", strategy="pipeline")]))
    assert two.generation == 2 and two.newer_than(one) and not one.newer_than(two)
    rival = VersionedSpec.first(ClusterSpec(models=[ModelEntry(model="other")])).model_copy(
        update={"generation": 2})
    assert rival.conflicts_with(two)
    assert rival.newer_than(two) != two.newer_than(rival)  # every node picks the same one


def test_a_distributed_spec_carries_no_secret_and_a_checked_hash() -> None:
    spec = ClusterSpec(cluster=ClusterSection(secret="hunter2"))
    versioned = VersionedSpec.first(spec)
    assert versioned.spec.cluster.secret is None
    assert "hunter2" not in versioned.model_dump_json()
    with pytest.raises(ValueError, match="hash does not match"):
        VersionedSpec(generation=1, hash="0" * 16, spec=spec)


def test_export_writes_the_observed_cluster_as_a_valid_spec(tmp_path: Path) -> None:
    nodes = [node(0, 600 << 20), node(1, 600 << 20, cap=550 << 20, labels={"room": "lab"}),
             NodeProfile(**{**node(2, 8 << 30).model_dump(), "name": "node1"})]
    pipeline = place(SMOLLM2, nodes[:2], strategy="pipeline", instance_id="smollm2-0")
    single = place(SMOLLM2, nodes[2:], instance_id="other-0")
    spec = spec_from_observed(nodes, [pipeline, single], cluster_name="lab")
    path = write(tmp_path, dump_spec(spec))
    assert validate_spec_file(path) == []
    exported = load_spec(path)
    by_name = {n.name: n for n in exported.nodes}
    # node1's name is taken twice (two agents on one host), so both are exported by id.
    assert set(by_name) == {"node0", "n1", "n2"}
    assert by_name["n1"].memory_cap == 550 << 20 and by_name["n1"].labels == {"room": "lab"}
    assert by_name["node0"].address == "127.0.0.1:52000"
    first, second = exported.models
    assert first.strategy == "auto" and first.nodes == ["n2"]
    assert second.strategy == "pipeline" and second.nodes == ["node0", "n1"]
    assert second.layers == [s.layer_stop - s.layer_start for s in pipeline.stages]
    # Placing the exported entry again reproduces the running placement.
    again = place(SMOLLM2, nodes, strategy="pipeline", pinned_nodes=second.nodes,
                  layer_counts=second.layers, instance_id="smollm2-0")
    assert again.stages == pipeline.stages


names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
labels = st.dictionaries(names, names, max_size=2)
specs = st.builds(
    ClusterSpec,
    cluster=st.builds(ClusterSection, name=names, secret=st.none() | names,
                      api_port=st.integers(1, 65535)),
    nodes=st.lists(st.builds(NodeEntry, name=names, labels=labels,
                             address=st.none() | st.sampled_from(["h", "h:80", "[::1]:8"]),
                             memory_cap=st.none() | st.integers(0, 1 << 40)),
                   max_size=4, unique_by=lambda n: n.name),
    models=st.lists(st.builds(ModelEntry, model=names, replicas=st.integers(1, 3),
                              strategy=st.sampled_from(["auto", "pipeline", "tensor", "hybrid"]),
                              labels=st.none() | labels,
                              context_length=st.none() | st.integers(1, 1 << 20),
                              kv_bits=st.none() | st.sampled_from([4, 8])),
                    max_size=4),
)


@settings(max_examples=60, deadline=None)
@given(spec=specs)
def test_dump_and_parse_round_trip_with_a_stable_hash(spec: ClusterSpec) -> None:
    again, errors = parse_spec(dump_spec(spec))
    assert errors == [] and again == spec
    assert spec_hash(again) == spec_hash(spec)


def _model_dir(root: Path, config: dict[str, object]) -> Path:
    import json

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_models_this_machine_sees_are_checked_against_the_registry(tmp_path: Path) -> None:
    llama = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
             "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 100}
    _model_dir(tmp_path / "mix", {**llama, "model_type": "frobnicator"})
    _model_dir(tmp_path / "llama", llama)
    _model_dir(tmp_path / "store" / "stored", {**llama, "model_type": "frobnicator"})
    (tmp_path / "store" / "stored" / "flock.json").write_text("{}")
    path = write(tmp_path, """
[[models]]
model = "mix"

[[models]]
model = "llama"
strategy = "tensor"
nodes = ["a", "b", "c"]

[[models]]
model = "llama"
strategy = "pipeline"

[[models]]
model = "org/only-on-the-hub"

[[models]]
model = "stored"
""")
    errors = {e.path: e.message for e in validate_spec_file(path, models_dir=tmp_path / "store")}
    assert "architecture 'frobnicator' is not supported" in errors["models[0].model"]
    assert "llama, mistral, qwen2, qwen3" in errors["models[0].model"]
    assert "needs 3 to divide heads (4)" in errors["models[1].strategy"]
    assert "models[2].strategy" not in errors and "models[3].model" not in errors
    assert "'frobnicator'" in errors["models[4].model"]
    # Without a store, names are not resolved; paths beside the spec still are.
    errors = {e.path for e in validate_spec_file(path)}
    assert "models[0].model" in errors and "models[4].model" not in errors
