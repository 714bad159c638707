"""Writing files atomically and reading checkpoints safely.

Every load goes through ``torch.load(..., weights_only=True)``: a checkpoint from someone else
can hold tensors and plain containers, never code that runs when it is unpickled. Every save is
atomic (temporary file, fsync, rename), so a kill at any moment leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from barlowtwins.encoder import EncoderInfo
from barlowtwins.runs.folder import RunFolder


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or not one of ours."""


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


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
