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

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError, ModelNotSupportedError

LLAMA_DIR = "llama"  # the only decoder architecture folder Spin knows
# Folders that Spin (or a future refllm) uses for other decoder architectures: a model
# found there exists but is not supported.
OTHER_ARCH_DIRS = ("mistral", "gpt2", "gptj", "gptneox", "bloom", "mpt", "falcon", "phi", "qwen2")


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refllm" / "models"


def models_root(explicit: str | os.PathLike | None = None) -> Path:
    """The models root, by SPEC 5's order of precedence."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("REFLLM_MODELS_DIR")
    if env:
        return Path(env)
    local = Path(".spin") / "ai-models"
    if local.is_dir():
        return local
    return user_cache_root()


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
