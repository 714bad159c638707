"""Writing files atomically and reading checkpoints and configs safely.

Every load goes through ``torch.load(..., weights_only=True)``: a checkpoint from someone else
can hold tensors and plain containers, never code that runs when it is unpickled. Every save is
atomic (temporary file, fsync, rename), so a kill at any moment leaves the previous file intact.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from barlowtwins.encoder import EncoderInfo
from barlowtwins.runs.folder import RunFolder


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or not one of ours."""


class RunInUseError(ValueError):
    """Another process holds the run folder; the message names it."""


@contextmanager
def run_lock(folder: RunFolder) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs: one writer per run folder at a time.

    An advisory ``flock`` on the run's ``.lock``, which the operating system releases when the
    holder exits, however it ends (``kill -9`` included), so a stale lock never blocks a rerun.
    The holder's pid is written into the file for the message a second process gets.

    Raises:
        RunInUseError: When another process holds the lock.
    """
    folder.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunInUseError(
                f"{folder.path} is in use by another barlowtwins fit (pid {owner}); wait for it "
                "to end, or give another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file could not be written; the message is one line naming the file and the cause.
    The previous file, if any, is intact and no temporary file is left."""


# A file system with less free space than this after a failed write is taken to be full: some
# writers report a full disk in words of their own (torch.save: "unexpected pos").
_NEARLY_FULL_BYTES = 1 << 20


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    The temporary file is flushed to disk before the rename, and the rename is made durable,
    so a kill at any moment leaves either the previous file or the new one, never half of
    one. A write that fails removes the temporary file and leaves the previous one as it was.

    Raises:
        WriteError: When the file system refuses the write (a full disk, no permission, ...).
        Exception: Whatever ``write`` raises for other reasons (a bug), unchanged.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as error:
        cause = file_system_refusal(path, error)
        if cause is None:
            raise
        raise WriteError(f"cannot write {path}: {cause}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def file_system_refusal(path: Path, error: Exception) -> str | None:
    """Why the file system refused a write into ``path``'s folder, or None when ``error`` is
    not the file system's (a bug, which should surface as it is)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or str(error)
    try:
        usage = shutil.disk_usage(path.parent)
    except OSError:
        return None
    if usage.free < _NEARLY_FULL_BYTES:
        return f"no space left on the device ({usage.free} bytes free)"
    return None


def current_umask() -> int:
    """The process's umask, for giving a file made private by ``tempfile`` plain permissions.

    ``os.umask`` only reads the mask by setting it, so it is set to 0 and straight back.

    Returns:
        The umask, e.g. ``0o022``.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights file "
            f"(weights_only load failed: {str(error).splitlines()[0]})"
        ) from None
    except Exception as error:  # the weights-only unpickler raises anything on garbage
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def save_encoder(backbone: nn.Module, info: EncoderInfo, folder: RunFolder) -> Path:
    """Write the run's ``backbone.pt`` (a plain state_dict) and ``backbone.json``.

    For torchvision ResNets the state_dict has torchvision's keys without ``fc``: load it with
    ``model.fc = torch.nn.Identity(); model.load_state_dict(state_dict)`` after applying the
    same stem (see :func:`barlowtwins.backbones.adapt_stem`).

    Returns:
        The path of ``backbone.pt``.
    """
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    atomic_write(folder.encoder_weights, lambda tmp: torch.save(state, tmp))
    atomic_write(
        folder.encoder_info,
        lambda tmp: tmp.write_text(json.dumps(asdict(info), indent=2) + "\n"),
    )
    return folder.encoder_weights


# A config or a run's config.yaml is a flat mapping of options to scalars or short lists: far
# below these bounds, which stop a hostile file (an alias bomb, megabytes of YAML, deep nesting)
# before it costs memory or a RecursionError.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_VALUES = 10_000
YAML_MAX_DEPTH = 4


def read_small_yaml(path: Path) -> Any:
    """A YAML file's content, refused unless it is small, shallow and expands to few values.

    ``yaml.safe_load`` runs no code, but it expands aliases: 331 bytes of "billion laughs"
    grow to gigabytes, and deep nesting ends in a ``RecursionError``. This reads at most
    ``YAML_MAX_BYTES``, composes the node graph (aliases stay shared references there),
    counts the values the content would expand to and its depth, and only then constructs it.

    Raises:
        ValueError: One line naming the file and what is wrong with it.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:
        raise ValueError(f"{path} is {size} bytes; a config holds at most {YAML_MAX_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{path} nests deeper than {YAML_MAX_DEPTH} levels") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if node is not None:
        _check_yaml_node(node, path, depth=1, budget=[YAML_MAX_VALUES])
    return yaml.safe_load(text)


def _check_yaml_node(node: yaml.Node, path: Path, *, depth: int, budget: list[int]) -> None:
    """Walk the node graph as construction would expand it, within the bounds."""
    if depth > YAML_MAX_DEPTH:
        raise ValueError(f"{path} nests deeper than {YAML_MAX_DEPTH} levels")
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(
            f"{path} expands to more than {YAML_MAX_VALUES} values (YAML aliases?); "
            "a config is a flat mapping of options"
        )
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _check_yaml_node(child, path, depth=depth + 1, budget=budget)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _check_yaml_node(key, path, depth=depth + 1, budget=budget)
            _check_yaml_node(value, path, depth=depth + 1, budget=budget)
