"""Models on disk, in Spin's layout (SPEC.md section 5).

    <root>/llama/<name>/   a decoder: config.json, tokenizer.json, model.safetensors ...
    <root>/<name>/         an embedding model: tokenizer.json, model.safetensors ...

The root is, in order: an explicit argument, `$REFLLM_MODELS_DIR`, `./.spin/ai-models`
if it exists, then a per-user cache (`$XDG_CACHE_HOME/refllm/models`, by default
`~/.cache/refllm/models`) where `refllm pull` puts models.

This module only *finds* models; loading them (and keeping them loaded) is the job of
`refllm.engine`, so that the models themselves never import the registry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError, ModelNotSupportedError

LLAMA_DIR = "llama"  # the only decoder architecture folder Spin knows
# Folders that Spin (or a future refllm) uses for other decoder architectures: a model
# found there exists but is not supported.
OTHER_ARCH_DIRS = ("mistral", "gpt2", "gptj", "gptneox", "bloom", "mpt", "falcon", "phi", "qwen2")


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refllm" / "models"


def models_root(explicit: str | os.PathLike | None = None) -> Path:
    """The models root, by SPEC 5's order of precedence. It need not exist yet (a pull
    creates it), but a path that is something other than a directory is invalid-input."""
    if explicit is not None:
        return _checked_root(Path(explicit), "the models root")
    env = os.environ.get("REFLLM_MODELS_DIR")
    if env:
        return _checked_root(Path(env), "$REFLLM_MODELS_DIR")
    local = Path(".spin") / "ai-models"
    if local.is_dir():
        return local
    return user_cache_root()


def _checked_root(root: Path, what: str) -> Path:
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"{what} {str(root)!r} is not a directory")
    return root


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "llama" | "embedding"
    path: Path

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _not_found(name: str) -> InvalidInputError:
    return InvalidInputError(f"no model directory found in registry for model '{name}'")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise InvalidInputError(f"invalid model name {name!r}")


def find_llm(name: str, root: str | os.PathLike | None = None) -> Path:
    """The directory of decoder model `name`: `<root>/llama/<name>`."""
    _check_name(name)
    base = models_root(root)
    path = base / LLAMA_DIR / name
    if path.is_dir():
        return path
    for arch in OTHER_ARCH_DIRS:
        if (base / arch / name).is_dir():
            raise ModelNotSupportedError(f"model '{name}' has architecture '{arch}', which refllm does not support")
    if _is_embedding_dir(base / name):
        raise ModelNotSupportedError(f"model '{name}' is an embedding model, not a text-generation model")
    raise _not_found(name)


def find_embedding_model(name: str, root: str | os.PathLike | None = None) -> Path:
    """The directory of embedding model `name`: `<root>/<name>`."""
    _check_name(name)
    base = models_root(root)
    path = base / name
    if name != LLAMA_DIR and name not in OTHER_ARCH_DIRS and path.is_dir():
        return path
    if (base / LLAMA_DIR / name).is_dir():
        raise ModelNotSupportedError(f"model '{name}' is a text-generation model, not an embedding model")
    raise _not_found(name)


def _is_embedding_dir(path: Path) -> bool:
    return path.is_dir() and path.name not in (LLAMA_DIR, *OTHER_ARCH_DIRS) and not path.name.startswith(".")


def list_models(root: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Every model under the root, decoders first, each list sorted by name."""
    base = models_root(root)
    entries: list[ModelEntry] = []
    llama = base / LLAMA_DIR
    if llama.is_dir():
        entries += [ModelEntry(p.name, "llama", p) for p in sorted(llama.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if base.is_dir():
        entries += [ModelEntry(p.name, "embedding", p) for p in sorted(base.iterdir()) if _is_embedding_dir(p)]
    return entries


def check_allowed(name: str, allowed: "list[str] | tuple[str, ...] | set[str] | None") -> None:
    """Spin's `ai_models` allow-list: None allows every model."""
    if allowed is not None and name not in allowed:
        raise InvalidInputError(
            f"The component does not have access to use '{name}'. To give the component access, "
            f"add '{name}' to the 'ai_models' key for the component in your spin.toml manifest"
        )


def find_model(name: str, root: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Every model on disk called `name` (a decoder and an embedding model may share one)."""
    _check_name(name)
    found = [e for e in list_models(root) if e.name == name]
    if not found:
        raise _not_found(name)
    return found


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 4 MiB blocks (the one helper: pull, show, golden)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_model(name: str, root: str | os.PathLike | None = None) -> dict:
    """What `refllm show` prints: where the model is, its config files, its parameter
    count (from the safetensors headers), every file with its size and sha256, and its
    chat template."""
    from safetensors import safe_open

    from .config import read_json

    entry = find_model(name, root)[0]
    path = entry.path
    files = sorted(p for p in path.rglob("*") if p.is_file())
    info: dict = {"name": entry.name, "kind": entry.kind, "path": str(path)}
    for stem in ("config", "generation_config", "sentence_bert_config"):
        info[stem] = read_json(path / f"{stem}.json") if (path / f"{stem}.json").is_file() else None
    parameters = None
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="numpy") as st:
                parameters = (parameters or 0) + sum(
                    int(np.prod(st.get_slice(k).get_shape(), dtype=np.int64)) for k in st.keys())
    info["parameters"] = parameters
    info["files"] = [{"path": f.relative_to(path).as_posix(), "size_bytes": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in files]
    info["size_bytes"] = sum(f["size_bytes"] for f in info["files"])
    tok_config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    template = tok_config.get("chat_template")
    info["chat_template"] = template if isinstance(template, str) else None
    return info


def remove_model(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Delete model `name` from disk; its former directories. Each directory is first renamed
    to a hidden one (atomically), so a removal that stops half way leaves nothing that loads."""
    paths = []
    for entry in find_model(name, root):
        doomed = entry.path.with_name(f".rm-{entry.name}-{os.getpid()}")
        os.rename(entry.path, doomed)
        shutil.rmtree(doomed)
        paths.append(entry.path)
    return paths
