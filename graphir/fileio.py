"""The one writer of every output a user names (`-o`, `--plot`, `--out`, `--dump` files, figures).

What lies at the path decides how it is written, so that an output never damages anything:

- a regular file, or nothing yet: atomically, through a temporary file in the same folder renamed
  over it, so no reader ever sees half a file and a failed write leaves the old one as it was;
  the file gets the mode a plain open() would give it (an existing file keeps its own);
- `-`: standard output;
- a character or block device, a FIFO, a socket: opened and written in place (streamed), never
  replaced and never unlinked (`-o /dev/null` must not turn /dev/null into a file);
- a symlink: written through to the file it resolves to, atomically next to that file; the link
  stays a link.

Every error is an OSError that names the user's path, never the hidden temporary file.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _named(e: OSError, path: str | Path) -> OSError:
    """The same error, naming the user's path (mkstemp's names the temporary file)."""
    if e.errno is None:
        return OSError(errno.EIO, str(e) or type(e).__name__, str(path))
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def _to_stdout(data: bytes) -> None:
    sys.stdout.flush()  # text printed before stays before
    buf = getattr(sys.stdout, "buffer", None)
    if buf is None:  # a text-only stream (a test's capture)
        sys.stdout.write(data.decode("utf-8", errors="replace"))
    else:
        buf.write(data)
        buf.flush()


def _stream(p: Path, mode: int, data: bytes) -> None:
    """Write in place to a device, FIFO or socket (a FIFO's open waits for its reader)."""
    if stat.S_ISSOCK(mode):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(p))
            s.sendall(data)
        return
    fd = os.open(p, os.O_WRONLY | os.O_NOCTTY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _replace(target: Path, data: bytes, old: os.stat_result | None) -> None:
    """Temporary file next to `target`, then rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates files 0600: give the mode open() would (an existing file keeps its own)
        os.chmod(tmp, stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_output(path: str | Path, data: str | bytes) -> None:
    """Write `data` (str as UTF-8) to the user's `path` as the module docstring says."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if str(path) == "-":
        _to_stdout(raw)
        return
    p = Path(path)
    try:
        try:
            st: os.stat_result | None = os.stat(p)  # follows a symlink to what it names
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        if st is not None and not stat.S_ISREG(st.st_mode):
            _stream(p, st.st_mode, raw)
        else:
            _replace(Path(os.path.realpath(p)), raw, st)
    except OSError as e:
        raise _named(e, path) from None


def check_output(path: str | Path) -> None:
    """Fail now (before any work) where `write_output(path, ...)` could not create its file:
    the path is a folder, or its folder does not exist or is not one."""
    if str(path) == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    if p.exists():
        return
    folder = Path(os.path.realpath(p)).parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"folder {folder} does not exist", str(path))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"folder {folder} is not writable", str(path))


write_atomic = write_output  # the name callers used before the writer learnt devices and links
