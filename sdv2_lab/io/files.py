"""Output files: written whole or not at all, with the permissions the user's umask gives (0644 normally).

``tempfile.mkstemp`` makes files readable by their owner only (0600); a file renamed into place from one keeps
that mode, so every output goes through ``publish`` (mode from the umask, then the rename).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux); else set and restored."""
    try:
        match = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Give ``tmp`` the default file mode and rename it over ``path`` (atomic on one file system)."""
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; published over ``path`` when the block succeeds, removed
    when it fails (nothing half-written is ever left, under either name)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """Fail now, before any work, if ``path`` cannot become a file: it is a folder, or its folder cannot be
    made or written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"the {what} path {path} is an existing folder; give a file name "
                                f"(e.g. {path / 'output.mp4'})")
    parent = path.parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"cannot write the {what} {path}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot write the {what} {path}: no write permission in {folder}")
            break
    return path
