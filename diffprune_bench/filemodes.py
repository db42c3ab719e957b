"""File modes: everything the project writes gets the mode a plain ``open`` would give it.

Some writers create their files 0600 whatever the umask: ``tempfile.mkstemp`` always, and safetensors
(behind diffusers' ``save_pretrained``) writes through a private temporary file. Exported weights and
cached bases then could not be read by the other users of a shared results or cache folder. Every
writer of the project goes through :func:`atomic_write` or calls :func:`honour_umask` on what a library
wrote, so a file ends 0666 less the umask (0644 under 0022) and a folder 0777 less it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_UMASK_GUARD = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it, so briefly, under a lock)."""
    with _UMASK_GUARD:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def honour_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes a plain ``open``/``mkdir`` would.

    Call it on what a library wrote (``save_pretrained``), before the result is renamed into place."""
    path = Path(path)
    files, folders = file_mode(), folder_mode()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, names in os.walk(path):
            os.chmod(root, folders)
            for name in names:
                target = Path(root) / name
                if not target.is_symlink():
                    os.chmod(target, files)
            dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
    elif path.is_file():
        os.chmod(path, files)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary name in the same folder, then rename it to ``path``.

    Readers never see half a file (a killed writer leaves only the temporary, which is removed when it
    can be), and the result has the umask's mode whatever ``write`` created it with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a text file, synced to disk before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)
