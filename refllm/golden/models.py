"""The models a golden set runs on: found by name in a models root, or given by path.

    models = Models.builtin(models_root)            # the default models, in Spin's layout
    models = Models.from_paths("ckpt/", embedder="minilm/")   # a user's: a Llama-family
    models = Models.from_paths("model.Q8_0.gguf")             # safetensors directory
                                                             # (one file or sharded) or a GGUF
    with models:                                   # a root where every model has a name
        root = models.root                         # (GGUFs converted into it), removed on exit
        header_entries = models.header()           # kind, sha256, files, tokenizer, ...

A user's models are put in a temporary models root of their own, in Spin's layout
(`<root>/llama/<name>` a link to the directory, `<root>/<name>` for the encoder), so that
every case, error cases included, runs through `refllm.infer` exactly as for the
default models. A GGUF is converted there by `refllm.weights.gguf_to_hf.convert`. A
`Models` pickles as its sources, so each Ray actor builds the same root on its node.

Each model is named in the header by sha256: of the .gguf file itself, or, for a
directory, of the lines ``<sha256>  <relative path>\\n`` of its files in sorted order
(what ``sha256sum`` prints for them).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import engine, registry
from ..errors import InvalidInputError
from .suite import EMBEDDER, LLM

BACKEND = "numpy"  # the reference: NumPy, float64, on every machine
PRECISION = "float64"

_sha_cache: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within this process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = registry.sha256_file(path)
    return _sha_cache[key]


def model_files(model_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a model directory, sorted."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in files}


def manifest_sha256(files: dict[str, str]) -> str:
    """The sha256 naming a directory: of `sha256sum`'s lines for its files, sorted by path."""
    return hashlib.sha256("".join(f"{sha}  {rel}\n" for rel, sha in sorted(files.items())).encode()).hexdigest()


@dataclass(frozen=True)
class Source:
    """One model: its name in the golden set, its kind and where it is read from."""

    name: str
    kind: str  # "llama" | "embedding"
    path: str  # a directory, or a .gguf file (decoders)

    @property
    def is_gguf(self) -> bool:
        return self.path.lower().endswith(".gguf")

    def files(self) -> dict[str, str]:
        p = Path(self.path)
        return {p.name: sha256_file(p)} if self.is_gguf else model_files(p)

    def sha256(self) -> str:
        return sha256_file(Path(self.path)) if self.is_gguf else manifest_sha256(self.files())


class Models:
    """The models of one golden run, by name, under one models root (see the module doc)."""

    def __init__(self, sources: tuple[Source, ...] = (), models_root=None):
        self.sources = tuple(sources)
        self.models_root = None if models_root is None else str(models_root)
        self._tmp: Path | None = None

    # -- construction
    @classmethod
    def builtin(cls, models_root=None) -> "Models":
        """The default models in a models root (SPEC 5's order when None)."""
        return cls((), registry.models_root(models_root))

    @classmethod
    def from_paths(cls, llm, embedder=None, *, llm_name: str | None = None,
                   embedder_name: str | None = None) -> "Models":
        """A user's decoder (a Llama safetensors directory or a .gguf file) and, optionally,
        an encoder directory, named after their file or directory unless names are given."""
        sources = [_source(llm, "llama", llm_name)]
        if embedder is not None:
            sources.append(_source(embedder, "embedding", embedder_name))
            if sources[0].name == sources[1].name:
                raise InvalidInputError(f"the decoder and the encoder are both named {sources[0].name!r}; "
                                        f"name one with --name / --embedding-name")
        return cls(tuple(sources))

    def __reduce__(self):  # a Ray actor gets the sources and builds its own root
        return (Models, (self.sources, self.models_root))

    # -- the root every case runs under
    def __enter__(self) -> "Models":
        self.root  # noqa: B018 - build it now (converting a GGUF), not in the first case
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def root(self) -> Path:
        if not self.sources:
            return Path(self.models_root)
        if self._tmp is None:
            tmp = Path(tempfile.mkdtemp(prefix="refllm-golden-models-"))
            try:
                for s in self.sources:
                    link = tmp / registry.LLAMA_DIR / s.name if s.kind == "llama" else tmp / s.name
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if s.is_gguf:
                        from ..weights.gguf_to_hf import convert

                        link.mkdir()
                        convert(s.path, link)
                    else:
                        link.symlink_to(Path(s.path).resolve(), target_is_directory=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._tmp = tmp
        return self._tmp

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- lookups
    @property
    def llm_name(self) -> str:
        return next((s.name for s in self.sources if s.kind == "llama"), LLM)

    @property
    def embedder_name(self) -> str | None:
        if not self.sources:
            return EMBEDDER
        return next((s.name for s in self.sources if s.kind == "embedding"), None)

    def kind(self, name: str) -> str | None:
        """"llama" or "embedding" for a model of this run, None for any other name."""
        if self.sources:
            return next((s.kind for s in self.sources if s.name == name), None)
        return {LLM: "llama", EMBEDDER: "embedding"}.get(name)

    def dir(self, name: str) -> Path:
        if self.kind(name) == "llama":
            return registry.find_llm(name, self.root)
        return registry.find_embedding_model(name, self.root)

    def llm(self, name: str):
        """The float64 NumPy decoder (`LoadedLLM`) the golden numbers come from."""
        return engine.get_llm(registry.find_llm(name, self.root), precision=PRECISION, backend=BACKEND)

    def embedder(self, name: str):
        return engine.get_embedder(registry.find_embedding_model(name, self.root), precision=PRECISION,
                                   backend=BACKEND)

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        return Source(name, self.kind(name), str(self.dir(name)))  # a model in the models root

    def header(self, names, decoder_facts=None) -> dict:
        """The header's "models" object for the models `names` (those of this run only).
        `decoder_facts(name)`: where the decoders' facts come from (default: this
        process's loaded model; a Ray run asks an actor, so the driver loads no weights)."""
        out = {}
        for name in sorted(n for n in set(names) if self.kind(n) is not None):
            src = self.source(name)
            files = src.files()
            entry = {"kind": src.kind, "format": "gguf" if src.is_gguf else "safetensors",
                     "sha256": src.sha256(),
                     "files": files, "tokenizer": f"tokenizers/{name}.json"}
            if src.kind == "llama":
                entry.update((decoder_facts or self.decoder_facts)(name))
            out[name] = entry
        return out

    def decoder_facts(self, name: str) -> dict:
        """What the header says of a decoder beside its files: EOS ids, vocabulary size and
        context length, as the loaded model has them."""
        llm = self.llm(name)
        return {"eos_token_ids": sorted(llm.eos_token_ids), "vocab_size": int(llm.model.config.vocab_size),
                "context_length": int(llm.context_length)}

    def tokenizer_file(self, name: str) -> Path:
        return self.dir(name) / "tokenizer.json"


def _source(path, kind: str, name: str | None) -> Source:
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"no model at {p}")
    if kind == "llama":
        if p.is_file() and p.suffix.lower() != ".gguf":
            raise InvalidInputError(f"{p}: a model is a Llama safetensors directory or a .gguf file")
        if p.is_dir() and not (p / "config.json").is_file():
            raise InvalidInputError(f"{p}: no config.json (a Hugging Face Llama directory has one)")
    elif not p.is_dir():
        raise InvalidInputError(f"{p}: an embedding model is a sentence-transformers directory")
    name = name or (p.stem if p.is_file() else p.resolve().name)
    try:
        registry._check_name(name)
    except InvalidInputError:
        raise InvalidInputError(f"{name!r} cannot name a model (give another with --name)") from None
    return Source(name, kind, str(p.resolve()))


__all__ = ["Models", "Source", "sha256_file", "model_files", "manifest_sha256", "BACKEND", "PRECISION"]
