"""The built-in golden set, generated on demand into a cache directory and reused.

    builtin_golden_dir(models_root=None, cases=None)   its directory (written on first use)
    golden_cache_root()                                $REFLLM_GOLDEN_CACHE, else
                                                       $XDG_CACHE_HOME/refllm/golden
                                                       (~/.cache/refllm/golden)

Nothing big is committed: the built-in set is generated from the models on disk the
first time it is asked for (a minute or two on a CPU), in a directory named after a
hash of the suite, refllm's version, the source of the modules that compute it
(`record.COMPUTE_MODULES`) and the models' sha256s, so that a new refllm, a change to
its arithmetic or a new model makes a new set. The newest `KEEP_CACHED` are kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .. import SPEC_VERSION, __version__
from .models import Models
from .reader import FORMAT_VERSION, GOLDEN_FILE, dumps
from .record import compute_digest
from .suite import SUITE, SUITE_VERSION, select
from .writer import write_golden

KEEP_CACHED = 8  # built-in sets kept in the cache (the most recently written)


def golden_cache_root() -> Path:
    env = os.environ.get("REFLLM_GOLDEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refllm" / "golden"


def builtin_key(models_root=None, cases: Iterable[str] | None = None) -> str:
    """A short hash naming the built-in set for these models, cases and refllm."""
    specs = select(cases)
    models = Models.builtin(models_root)
    shas = {name: models.source(name).files() for name in sorted({s.model for s in specs}) if models.kind(name)}
    blob = dumps({"format_version": FORMAT_VERSION, "suite_version": SUITE_VERSION, "refllm": __version__,
                  "spec": SPEC_VERSION, "cases": [repr(s) for s in specs], "models": shas, "code": compute_digest()})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def builtin_golden_dir(models_root=None, cases: Iterable[str] | None = None, *, cache_dir=None,
                       progress: bool = False) -> Path:
    """The directory of the built-in golden set (or of the named `cases`) for the models
    under `models_root`, generated into the cache on first use."""
    cases = None if cases is None else list(cases)
    root = Path(cache_dir) if cache_dir is not None else golden_cache_root()
    target = root / f"{SUITE}-v{SUITE_VERSION}-{builtin_key(models_root, cases)}"
    if (target / GOLDEN_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write_golden(tmp, models_root, cases=cases, progress=progress)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            if not (target / GOLDEN_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep=KEEP_CACHED)
    return target


def _prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` newest built-in sets from the cache."""
    sets = sorted((d for d in root.glob(f"{SUITE}-v*") if (d / GOLDEN_FILE).is_file()),
                  key=lambda d: (d / GOLDEN_FILE).stat().st_mtime, reverse=True)
    for d in sets[keep:]:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["builtin_golden_dir", "golden_cache_root", "builtin_key", "KEEP_CACHED"]
