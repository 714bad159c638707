"""The index of an image folder: one scan per folder, cached on disk and shared by every process.

Listing a folder of a million images is the slow part of starting a run on it, and a run
lists it several times: the folder recipe reads its image count, the worker count depends on
it, and every DDP rank loads the data again. :func:`folder_index` lists a folder once, writes
what it found to a file in the cache directory (:func:`index_cache_dir`) and hands that file
to every later caller while the folder is unchanged:

* **What is scanned.** Names only: the scan follows sorted directory entries depth first,
  skips hidden names, keeps files whose extension is an image's, and rejects names that are
  not UTF-8 and entries that are not regular files (a pipe would block its reader forever).
  The type comes with the listing, so no file is opened, access-checked or ``stat``-ed
  (symbolic links, whose target's type takes a ``stat``, aside): empty, unreadable,
  truncated, non-image files and decompression bombs are found when they are decoded, and
  skipped and counted there.
* **Change detection.** An entry added to, removed from or renamed in a directory changes the
  directory's mtime and ctime, so the index records both for every directory of the tree and
  is reused while one ``stat`` per directory (not per file) finds them unchanged. A file
  rewritten in place changes neither and is not detected, which the index, holding names
  only, does not need: the file is read when it is decoded, and skipped then if it became
  unreadable. A directory modified less than :data:`RACY_SECONDS` before it was
  listed could change again within the same timestamp tick without its mtime changing (git's
  "racy clean" entries); an index holding such a directory is not trusted by another process,
  which scans again, so a folder is scanned twice when a run starts right after it was
  written.
* **One scan at a time.** A process that finds no valid index takes an exclusive
  ``fcntl.flock`` on the folder's lock file, looks again (another process may just have
  written it), and only then scans; processes started together on one machine (torchrun,
  SLURM) wait for the first one's scan instead of repeating it. Index files are replaced
  atomically (a temporary file renamed), so readers need no lock, and a torn file after a
  crash fails its length checks and is scanned again.
* **The ranks of one run.** Lightning starts ranks 1.. of a one-node run as child processes
  of rank 0 after rank 0 loaded its data. Rank 0 names the index it used in an environment
  variable that its children inherit, and each child uses exactly that index, unchecked, so
  every rank sees the same files even if the folder changes meanwhile.

Within a process the index is kept in memory and re-validated (directory stats) on each use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import operator
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from barlowtwins.data.datasets import DataError

if sys.platform != "win32":
    import fcntl

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
#: Environment variable naming the cache directory of folder indexes (see
#: :func:`index_cache_dir`).
INDEX_CACHE_ENV = "BARLOWTWINS_CACHE"
#: A directory modified this recently before it was listed may have changed again unseen
#: within its timestamp tick: 2 s covers the coarsest common one (FAT's).
RACY_SECONDS = 2.0
# Bumped when the file layout changes; an index of another format is scanned again.
_FORMAT = 1
# Rank 0 -> the ranks it launches: {"pid": rank 0's pid, "tokens": {real path: token}}.
_SHARED_ENV = "BARLOWTWINS_FOLDER_INDEXES"
_RACY_NS = int(RACY_SECONDS * 1e9)
# Temporary files of an interrupted write are removed once they are this old.
_STALE_TEMPORARY_S = 24 * 3600
_FS_ENCODING = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_BY_NAME = operator.attrgetter("name")

# This process's indexes by real path, re-validated on every use.
_KNOWN: dict[str, FolderIndex] = {}
# Cache directories this process could not write (warned about once each).
_UNWRITABLE: set[str] = set()


@dataclass(frozen=True)
class FolderIndex:
    """The candidate image files below a folder, as one scan found them.

    Attributes:
        root: The folder's real path (symlinks resolved), which keys the cache.
        files: The candidates' paths relative to ``root``, in scan order: depth first, each
            directory's entries sorted by name.
        tops: int32 array ``(N,)``: each file's first-level folder as an index into
            ``folders``, or -1 for a file directly in ``root``.
        folders: The first-level folders that hold files, sorted by name.
        skipped: ``(relative path, reason)`` of the entries rejected by the scan (name not
            UTF-8, not a regular file, folder that cannot be listed); the path is printable
            (undecodable bytes as escapes).
        directories: ``(relative path, mtime_ns, ctime_ns)`` of every directory listed, the
            root as ``""``.
        racy: Whether a directory was modified less than :data:`RACY_SECONDS` before it was
            listed (then only this process and the ranks it launches trust the index).
        token: A random identifier of this scan.
    """

    root: str
    files: list[str]
    tops: np.ndarray
    folders: list[str]
    skipped: list[tuple[str, str]]
    directories: list[tuple[str, int, int]]
    racy: bool
    token: str

    def __len__(self) -> int:
        """Number of candidate image files."""
        return len(self.files)

    def paths(self, root: str | Path) -> list[str]:
        """The files' paths below ``root`` (this folder as the caller spells it)."""
        prefix = os.path.join(os.fspath(root), "")
        return [prefix + name for name in self.files]

    def unchanged(self) -> bool:
        """Whether every directory still has its recorded mtime and ctime."""
        for relative, mtime, ctime in self.directories:
            try:
                stat = os.stat(os.path.join(self.root, relative) if relative else self.root)
            except OSError:
                return False
            if stat.st_mtime_ns != mtime or stat.st_ctime_ns != ctime:
                return False
        return True


def index_cache_dir() -> Path:
    """Where folder indexes are kept: ``$BARLOWTWINS_CACHE/folders``, else
    ``$XDG_CACHE_HOME/barlowtwins/folders``, else ``~/.cache/barlowtwins/folders``.
    Deleting it (or one ``.idx`` file) makes the next run scan again."""
    base = os.environ.get(INDEX_CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "barlowtwins") if xdg else "~/.cache/barlowtwins"
    return Path(base).expanduser() / "folders"


def folder_index(root: str | Path) -> FolderIndex:
    """The index of the image folder ``root``: reused while the folder is unchanged, else
    scanned once (under a lock shared by every process) and written to the cache.

    Args:
        root: The image folder.

    Returns:
        The index.

    Raises:
        DataError: If ``root`` cannot be listed.
    """
    real = os.path.realpath(os.fspath(root))
    known = _KNOWN.get(real)
    if known is not None and known.unchanged():
        return known
    try:
        os.scandir(real).close()
    except OSError as exc:
        # Before any cache file is made for it.
        raise DataError(f"cannot list image folder {root}: {exc.strerror or exc}") from None
    inherited = _inherited_tokens().get(real)
    cache = _index_file(real)
    index = _read(cache, real)
    if index is not None and inherited is not None:
        if index.token == inherited:
            _log.info(
                "%s: using the index of %d files of the process that launched this one",
                real,
                len(index),
            )
            return _remember(index, shared=True)
        _log.warning(
            "%s: the index of the process that launched this one was replaced; this process "
            "uses the folder as it is now, which may differ from what that process loaded",
            real,
        )
    if index is not None and _trusted(index):
        _log.info("%s: reusing its index of %d files (%s)", real, len(index), cache)
        return _remember(index, shared=True)
    with _exclusive(cache.with_suffix(".lock"), real):
        # Another process may have written a valid index while this one waited.
        index = _read(cache, real)
        if index is not None and _trusted(index):
            _log.info(
                "%s: reusing the index of %d files another process just wrote", real, len(index)
            )
            return _remember(index, shared=True)
        started = time.perf_counter()
        index = _scan(real)
        written = _write(index, cache)
        _log.info(
            "%s: indexed %d image files in %.1f s (%s)",
            real,
            len(index),
            time.perf_counter() - started,
            cache if written else "not cached",
        )
    return _remember(index, shared=written)


def _trusted(index: FolderIndex) -> bool:
    """Whether another process's index may be used: not racy and every directory unchanged."""
    return not index.racy and index.unchanged()


def _remember(index: FolderIndex, *, shared: bool) -> FolderIndex:
    """Keeps ``index`` for this process and, when it is on disk, names it to the ranks this
    process launches."""
    _KNOWN[index.root] = index
    if shared:
        _inherited_tokens()  # read what this process inherited before replacing it
        try:
            current = json.loads(os.environ.get(_SHARED_ENV, ""))
            tokens = current["tokens"] if current["pid"] == os.getpid() else {}
        except (ValueError, KeyError, TypeError):
            tokens = {}
        tokens[index.root] = index.token
        os.environ[_SHARED_ENV] = json.dumps({"pid": os.getpid(), "tokens": tokens})
    return index


@functools.cache
def _inherited_tokens() -> dict[str, str]:
    """The indexes that this process's parent used, when the parent launched this process as
    one of its ranks (``LOCAL_RANK`` > 0): Lightning's ranks 1.. are rank 0's children."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        return {}
    try:
        shared = json.loads(os.environ.get(_SHARED_ENV, ""))
        if shared["pid"] != os.getppid():
            return {}
        return {str(path): str(token) for path, token in shared["tokens"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def index_file(root: str | Path) -> Path:
    """The file that caches the index of the folder ``root`` (in :func:`index_cache_dir`);
    the lock of its scan is the same name with the suffix ``.lock``."""
    return _index_file(os.path.realpath(os.fspath(root)))


def _index_file(real: str) -> Path:
    """The folder's name, for people who look, and a hash of its whole real path, which keys
    it."""
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:32]
    name = _UNSAFE_NAME.sub("_", os.path.basename(real))[:40] or "root"
    return index_cache_dir() / f"{name}-{digest}.idx"


@contextlib.contextmanager
def _exclusive(lock_file: Path, real: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``lock_file`` (released when the process ends, however
    it ends). Where no lock can be had (no cache directory, a file system without locks, no
    ``fcntl``), it goes on without one: two processes then both scan, and both write the same
    index."""
    handle = None
    with contextlib.suppress(OSError):
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if handle is not None and sys.platform != "win32":
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log.info("%s: waiting for another process that is indexing it", real)
                with contextlib.suppress(OSError):
                    fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:
                pass  # no locks on this file system (some NFS mounts)
        yield
    finally:
        if handle is not None:
            os.close(handle)


def _scan(real: str) -> FolderIndex:
    """Lists the candidate image files below ``real``, in sorted depth-first order.

    An explicit stack instead of recursion keeps arbitrarily deep trees safe; the (device,
    inode) of every directory listed stops symlink loops and double visits.

    Raises:
        DataError: If ``real`` cannot be listed.
    """
    files: list[str] = []
    tops: list[int] = []
    skipped: list[tuple[str, str]] = []
    directories: list[tuple[str, int, int]] = []
    top_names: list[str] = []
    try:
        listed = time.time_ns()
        stat = os.stat(real)
        first = _sorted_entries(real)
    except OSError as exc:
        raise DataError(f"cannot list image folder {real}: {exc.strerror or exc}") from None
    directories.append(("", stat.st_mtime_ns, stat.st_ctime_ns))
    racy = listed - stat.st_mtime_ns < _RACY_NS
    visited = {(stat.st_dev, stat.st_ino)}
    # (entries still to visit, the directory's path relative to real + separator, its top)
    stack: list[tuple[Iterator[os.DirEntry[str]], str, int]] = [(iter(first), "", -1)]
    while stack:
        entries, prefix, top = stack[-1]
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if _is_dir(entry):
                relative = prefix + name
                try:
                    listed = time.time_ns()
                    stat = entry.stat()
                    if (stat.st_dev, stat.st_ino) in visited:
                        continue
                    visited.add((stat.st_dev, stat.st_ino))
                    directories.append((relative, stat.st_mtime_ns, stat.st_ctime_ns))
                    racy = racy or listed - stat.st_mtime_ns < _RACY_NS
                    children = _sorted_entries(entry.path)
                except OSError as exc:
                    why = f"cannot list folder: {exc.strerror or exc}"
                    skipped.append((_printable(relative), why))
                    continue
                if top < 0:
                    top_names.append(name)
                child_top = top if top >= 0 else len(top_names) - 1
                stack.append((iter(children), relative + os.sep, child_top))
                break
            if name[name.rfind(".") :].lower() not in IMAGE_EXTENSIONS:
                continue
            reason = _unusable_name_reason(entry)
            if reason is None:
                files.append(prefix + name)
                tops.append(top)
            else:
                skipped.append((_printable(prefix + name), reason))
        else:
            stack.pop()
    folders, top_array = _sorted_tops(top_names, np.array(tops, dtype=np.int32))
    return FolderIndex(
        real, files, top_array, folders, skipped, directories, racy, uuid.uuid4().hex
    )


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=_BY_NAME)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _unusable_name_reason(entry: os.DirEntry[str]) -> str | None:
    """Why a file with an image extension cannot be used, from its listing alone, or None."""
    name = entry.name
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            # Undecodable names cannot be shown, logged or stored portably downstream.
            return "file name is not valid UTF-8"
    try:
        # The listing gives the type (no system call) except for symbolic links.
        regular = entry.is_file()
    except OSError:
        regular = False
    # Opening a pipe or a device could block forever; a broken link cannot be read.
    return None if regular else "not a regular file (broken link, device or pipe)"


def _sorted_tops(names: list[str], tops: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The first-level folders that hold files, sorted by name, and ``tops`` renumbered to
    index them."""
    used = np.unique(tops[tops >= 0])
    order = sorted(used.tolist(), key=lambda i: names[i])
    renumber = np.full(len(names) + 1, -1, dtype=np.int32)  # the last slot maps -1 to -1
    renumber[order] = np.arange(len(order), dtype=np.int32)
    return [names[i] for i in order], renumber[tops]


def _printable(path: str) -> str:
    """``path`` with undecodable bytes (held as surrogates by ``os``) written as escapes."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- the index file
#
# Line 1, JSON: format, root, token, count, bytes (of the paths), racy, extensions (read alone
# when pruning).
# Line 2, JSON: folders, skipped, directories.
# Then count little-endian int32 tops, then the relative paths in the file system's encoding,
# separated by NUL bytes (the one byte no path holds).


def _write(index: FolderIndex, index_file: Path) -> bool:
    """Writes ``index`` atomically; False (with a warning, once per directory) when the cache
    cannot be written."""
    names = "\0".join(index.files).encode(*_FS_ENCODING)
    head = {
        "format": _FORMAT,
        "root": index.root,
        "token": index.token,
        "count": len(index),
        "bytes": len(names),
        "racy": index.racy,
        "extensions": sorted(IMAGE_EXTENSIONS),
    }
    body = {
        "folders": index.folders,
        "skipped": index.skipped,
        "directories": index.directories,
    }
    folder = index_file.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A unique name, created with the permissions that the umask gives (mkstemp's 0600
        # would hide a team's shared cache from the team).
        temporary = folder / f".{index_file.name}.{uuid.uuid4().hex}.tmp"
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(json.dumps(head).encode() + b"\n" + json.dumps(body).encode() + b"\n")
                out.write(index.tops.astype("<i4").tobytes())
                out.write(names)
            os.replace(temporary, index_file)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    except OSError as exc:
        if str(folder) not in _UNWRITABLE:
            _UNWRITABLE.add(str(folder))
            _log.warning(
                "cannot write folder indexes to %s (%s): every process scans its folders "
                "itself; set %s to a writable directory",
                folder,
                exc.strerror or exc,
                INDEX_CACHE_ENV,
            )
        return False
    _prune(folder, keep=index_file)
    return True


def _read(index_file: Path, real: str) -> FolderIndex | None:
    """The index in ``index_file`` if it is a complete one of this format for ``real``."""
    try:
        data = index_file.read_bytes()
    except OSError:
        return None
    try:
        end_head = data.index(b"\n")
        head = json.loads(data[:end_head])
        if (
            head["format"] != _FORMAT
            or head["root"] != real
            or head["extensions"] != sorted(IMAGE_EXTENSIONS)
        ):
            return None
        end_body = data.index(b"\n", end_head + 1)
        body = json.loads(data[end_head + 1 : end_body])
        count = int(head["count"])
        start = end_body + 1 + 4 * count
        if len(data) - start != int(head["bytes"]):
            return None  # torn by a crash before the file reached the disk
        tops = np.frombuffer(data, dtype="<i4", count=count, offset=end_body + 1)
        files = data[start:].decode(*_FS_ENCODING).split("\0") if count else []
        if len(files) != count:
            return None
        return FolderIndex(
            real,
            files,
            tops.astype(np.int32),
            [str(name) for name in body["folders"]],
            [(str(path), str(reason)) for path, reason in body["skipped"]],
            [(str(path), int(mtime), int(ctime)) for path, mtime, ctime in body["directories"]],
            bool(head["racy"]),
            str(head["token"]),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _prune(folder: Path, *, keep: Path) -> None:
    """Removes the indexes (and lock files) of folders that no longer exist, and temporary
    files that interrupted writes left behind."""
    now = time.time()
    for path in folder.iterdir():
        try:
            if path.name.endswith(".tmp"):
                if now - path.stat().st_mtime > _STALE_TEMPORARY_S:
                    path.unlink()
            elif path.suffix == ".idx" and path != keep:
                with open(path, "rb") as handle:
                    head: dict[str, Any] = json.loads(handle.readline())
                if not os.path.isdir(head["root"]):
                    path.unlink()
                    path.with_suffix(".lock").unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed or being replaced by another process, or not ours
