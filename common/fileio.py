"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

The recipe: write a temporary file in the same directory (so `os.replace` is a rename on one
filesystem), flush and fsync it, rename it over the target, then fsync the directory so the
rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read it back: mkstemp makes 0600 files; ours get the usual permissions


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces `path` atomically when the block exits cleanly.

    If the block raises, the temporary file is removed and `path` is left untouched.

    Args:
        path: the file to create or replace.
        mode: "wb" or "w" (text, UTF-8).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` a regular file with `src`'s content, atomically.

    A hard link costs no extra write (and stays a regular file, unlike a symlink); where the
    filesystem has no hard links the content is copied.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        with atomic_write(dst) as out, open(src, "rb") as inp:
            while chunk := inp.read(1 << 24):
                out.write(chunk)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dst.parent)


def write_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Create or replace folder `path` whole: `write(tmp)` fills a temporary sibling folder,
    which is then renamed into place, so a reader sees the old folder or the complete new one,
    and a failure (an exception in `write`, Ctrl-C) leaves `path` as it was and nothing else.

    Args:
        path: the folder to create, or to replace when it exists.
        write: fills the folder it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
        write(tmp)
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if path.exists():  # replacing: move the old folder aside first, delete it last
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / path.name, path)  # put the old folder back
                raise
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
