"""Atomic writes: a file or a folder is written under a temporary name beside its target, fsynced and renamed
over the target, so a reader sees the old one or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Iterator


def fsync_path(path: str) -> None:
    """Flush a file (or a directory entry list) to stable storage."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Flush every file directly in ``folder``, then the folder itself (before renaming it into place)."""
    for name in os.listdir(folder):
        fsync_path(os.path.join(folder, name))
    fsync_path(folder)


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "wb") -> Iterator[IO]:
    """A handle (``"wb"`` or ``"w"``, UTF-8) on a temporary file beside ``path``, fsynced and renamed
    over it on success (removed on error), so readers see the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are data for other users and jobs
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sibling(path: str, tag: str) -> str:
    """``.TAG-NAME`` beside ``path``: the temporary (``tmp``) or displaced (``old``) name of a folder swap.
    Dot-prefixed so listings of step folders and globs skip it."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{tag}-{name}")


def swap_folder(tmp: str, path: str) -> None:
    """Put the complete folder ``tmp`` in place as ``path``: fsync its files and itself, move an existing
    ``path`` aside, rename ``tmp`` to ``path`` (one rename: no reader sees a mix), fsync the parent, then
    delete the displaced folder. If the rename fails the displaced folder is moved back."""
    fsync_tree(tmp)
    old = sibling(path, "old")
    shutil.rmtree(old, ignore_errors=True)
    displaced = os.path.exists(path)
    if displaced:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if displaced:
            os.replace(old, path)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """An empty temporary folder beside ``path`` to fill; when the block ends it replaces ``path``
    (``swap_folder``); on an error it is removed and ``path`` is left as it was."""
    tmp = sibling(path, "tmp")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
    os.makedirs(tmp)
    try:
        yield tmp
        swap_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
