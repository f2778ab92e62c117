"""The local-disk backend: plain OS calls (``pread``, rename, hard link) where fsspec would add a layer.

A glob follows links to folders (as ``glob.glob`` does) but enters each real folder once, so a link
loop ends; a walk lists dangling links and FIFOs too (the index reports them); files come out sorted.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import shutil
import stat
import uuid
from typing import BinaryIO, Iterator

from fsspec.implementations.local import LocalFileSystem

from featcache.retry import storage_errors
from featcache.store.backend import GLOB_CHARS, Capabilities, FsspecBackend, Stamp, glob_top


class LocalBackend(FsspecBackend):
    """Files on a local disk (or a mounted one), reached by plain OS calls."""

    capabilities = Capabilities(positional_reads=True, atomic_rename=True, latency_bound=False)

    def __init__(self):
        super().__init__(LocalFileSystem())

    def uri(self, path: str) -> str:
        return path

    def join(self, path: str, *parts: str) -> str:
        return os.path.join(path, *parts)

    def read_range(self, path: str, start: int, length: int) -> bytes:
        return self.read_stamped(path, start, length)[0]

    def read_stamped(self, path: str, start: int, length: int) -> tuple[bytes, Stamp]:
        """One ``pread``; the stamp comes from the open file."""
        # O_NONBLOCK: a FIFO named like a shard must not block the open (it is refused just after)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            return os.pread(fd, max(length, 0), start), Stamp(st.st_size, mtime=st.st_mtime)
        finally:
            os.close(fd)

    def stamp(self, path: str) -> Stamp:
        st = os.stat(path)
        return Stamp(st.st_size, mtime=st.st_mtime)

    def mtime(self, path: str) -> float | None:
        return os.stat(path).st_mtime

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def open(self, path: str) -> BinaryIO:
        return open(path, "rb")

    @contextlib.contextmanager
    def open_stamped(self, path: str, block_size: int | None = None) -> Iterator[tuple[BinaryIO, Stamp]]:
        """Special files (FIFOs, devices) are refused without being opened; a missing file raises
        FileNotFoundError saying whether it is a broken symbolic link."""
        try:
            st = os.stat(path)
        except FileNotFoundError as e:
            reason = "broken symbolic link" if os.path.islink(path) else "file vanished"
            raise FileNotFoundError(errno.ENOENT, reason, path) from e
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        with open(path, "rb", buffering=block_size or -1) as f:
            yield f, Stamp(st.st_size, mtime=st.st_mtime)

    def write_atomic(self, path: str, data: bytes) -> None:
        """A temporary sibling renamed over the target, removed when the write fails."""
        with storage_errors(f"writing {path}"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_then_rename(path, data)

    def write_if_absent(self, path: str, data: bytes) -> bool:
        """Exact: a hard link of a complete temporary file fails if the target exists."""
        if os.path.lexists(path):
            return False
        with storage_errors(f"writing {path}"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                _write_then_rename(path, data, os.link)
                return True
            except FileExistsError:
                return False

    def upload(self, path: str, local: str) -> None:
        """A temporary sibling copied from ``local``, renamed over the target."""
        with storage_errors(f"writing {path}"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_then_rename(path, None, source=local)

    def download(self, path: str, local: str) -> None:
        shutil.copyfile(path, local)

    def list(self, path: str, detail: bool = False) -> list:
        return self.fs.ls(path, detail=detail)

    def find(self, path: str) -> list[str]:
        """Every non-directory entry below ``path`` (dangling links and FIFOs included), sorted by folder."""
        out = []
        for dirpath, _, filenames in os.walk(path):
            out += [os.path.join(dirpath, f) for f in filenames]
        return sorted(out, key=lambda p: p[len(path):].split(os.sep))

    def glob(self, pattern: str) -> tuple[list[str], list[tuple[str, str]]]:
        prefix, top = glob_top(pattern)
        files, unlisted = glob_local(top, pattern[len(prefix):])
        return sorted(files), unlisted

    def zarr_store(self, path: str, uri: str, read_only: bool = False):
        from zarr.storage import LocalStore

        return LocalStore(path, read_only=read_only)


def _write_then_rename(path: str, data: bytes | None, publish=os.replace, source: str | None = None) -> None:
    """Write a complete temporary sibling (``data``, or a copy of the local file ``source``), then ``publish``
    it at ``path`` (rename over, or link); the temporary file never outlives the call."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        if source is not None:
            shutil.copyfile(source, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed away, or never created
            os.unlink(tmp)


def glob_local(top: str, pattern: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Non-directory entries below ``top`` whose relative path matches ``pattern`` (``glob.glob``'s
    rules, ``**`` recursive), and (folder, reason) of folders that could not be listed. Links to
    folders are followed, but each real folder (st_dev, st_ino) is entered once, under its first path
    in sorted order: a link loop ends, and nothing is listed twice."""
    segments, seen = tuple(pattern.split("/")), set()
    stack, files, unlisted = [(top, (), True)], [], []
    while stack:  # depth first, children in sorted order: files come out sorted
        path, parts, is_dir = stack.pop()
        if not is_dir:
            files += [path] if _glob_match(parts, segments) else []
            continue
        try:
            if _first_visit(path, seen):
                stack += reversed(_children(path, parts, segments))
        except (FileNotFoundError, NotADirectoryError):
            continue  # vanished while listing, or the glob's fixed part is not a folder: nothing there
        except OSError as e:
            unlisted.append((path, f"cannot list folder: {e.strerror or e}"))
    return files, unlisted


def _first_visit(path: str, seen: set) -> bool:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _children(path: str, parts: tuple, segments: tuple) -> list[tuple[str, tuple, bool]]:
    """(path, relative parts, is folder) of the entries of ``path`` that the pattern may reach, in the
    order their paths sort as strings (a folder ``a`` sorts as ``a/``)."""
    with os.scandir(path) as it:
        kids = [(e.path, (*parts, e.name), e.is_dir()) for e in it]
    kids = [k for k in kids if not k[2] or _glob_match(k[1], segments, partial=True)]
    return sorted(kids, key=lambda k: k[1][-1] + "/" if k[2] else k[1][-1])


def _glob_match(parts: tuple, segments: tuple, partial: bool = False) -> bool:
    """Whether the path ``parts`` matches the glob ``segments`` (``partial``: whether a path below
    the folder ``parts`` could)."""
    if not parts:
        return bool(segments) if partial else all(s == "**" for s in segments)
    if not segments:
        return False
    if segments[0] == "**":  # zero or more folders whose names do not start with a dot
        return _glob_match(parts, segments[1:], partial) or (
            not parts[0].startswith(".") and _glob_match(parts[1:], segments, partial))
    return _name_match(parts[0], segments[0]) and _glob_match(parts[1:], segments[1:], partial)


def _name_match(name: str, segment: str) -> bool:
    if not any(c in segment for c in GLOB_CHARS):
        return name == segment
    if name.startswith(".") and not segment.startswith("."):
        return False  # as in glob.glob: a wildcard does not match a leading dot
    return fnmatch.fnmatchcase(name, segment)
