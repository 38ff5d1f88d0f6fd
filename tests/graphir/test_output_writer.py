"""Issue 15 item 1: every verb writes its outputs through graphir.fileio.write_output.

A regular file or a new path is replaced atomically; `-` is stdout; a device, FIFO or socket is
written in place and stays what it was; a symlink is written through and stays a link; a failed
write leaves the old file as it was, no temporary file, and an error naming the user's path.
Devices are made with mknod in a temporary folder (never the real /dev).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cli.main import main
from graphir.fileio import write_output

ROOT = Path(__file__).resolve().parents[2]
PREDICT = ["predict", "qwen3-8b", "--ctx", "4096"]


def char_device(path: Path, minor: int) -> Path:
    """A character device of the mem driver (major 1): minor 3 is null's, 7 is full's."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here: {e}")
    try:
        os.close(os.open(path, os.O_WRONLY))
    except OSError as e:  # a folder mounted nodev
        pytest.skip(f"device nodes do not open here: {e}")
    return path


def predicted(capsys: pytest.CaptureFixture[str]) -> str:
    """The table `predict` prints on stdout: what every output below must hold."""
    assert main(PREDICT) == 0
    return capsys.readouterr().out


def only_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_full_device_is_an_error_naming_it_and_stays_a_device(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    full = char_device(tmp_path / "full", 7)
    assert main([*PREDICT, "-o", str(full)]) == 2
    line = only_line(capsys.readouterr().err)
    assert str(full) in line and os.strerror(errno.ENOSPC) in line and ".tmp" not in line
    assert stat.S_ISCHR(os.lstat(full).st_mode) and os.lstat(full).st_rdev == os.makedev(1, 7)
    assert sorted(os.listdir(tmp_path)) == ["full"]


def test_a_null_device_is_written_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    null = char_device(tmp_path / "null", 3)
    assert main([*PREDICT, "-o", str(null)]) == 0
    assert capsys.readouterr().out == ""
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(tmp_path)) == ["null"]


def test_a_fifo_reader_receives_the_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = predicted(capsys)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    try:
        assert main([*PREDICT, "-o", str(fifo)]) == 0
    finally:
        if reader.is_alive() and not got:  # the writer failed before opening: let the reader go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(30)
    assert got == [want.encode()]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_socket_is_written_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = predicted(capsys)
    path = tmp_path / "sock"
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                got.append(b"".join(iter(lambda: conn.recv(65536), b"")))

        t = threading.Thread(target=serve)
        t.start()
        assert main([*PREDICT, "-o", str(path)]) == 0
        t.join(30)
    assert got == [want.encode()] and stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_symlink_is_written_through(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = predicted(capsys)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "table.md"
    target.write_text("old\n")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    assert main([*PREDICT, "-o", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == want
    assert sorted(os.listdir(tmp_path)) == ["link.md", "real"] and os.listdir(target.parent) == ["table.md"]
    dangling = tmp_path / "dangling.md"  # a link to a file not there yet creates the file
    dangling.symlink_to(tmp_path / "real" / "new.md")
    assert main([*PREDICT, "-o", str(dangling)]) == 0
    assert dangling.is_symlink() and (tmp_path / "real" / "new.md").read_text() == want


def test_dash_is_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    want = predicted(capsys)
    monkeypatch.chdir(tmp_path)
    assert main([*PREDICT, "-o", "-"]) == 0
    assert capsys.readouterr().out == want
    assert os.listdir(tmp_path) == []  # no file named '-'


def test_modes_like_open(tmp_path: Path) -> None:
    new = tmp_path / "new.txt"
    write_output(new, "a\n")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o640)
    write_output(kept, b"y")
    assert kept.read_bytes() == b"y" and stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """The file-size limit (RLIMIT_FSIZE) makes the write fail part-way, as a full disk would."""
    old = tmp_path / "table.md"
    old.write_text("the previous table\n")
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512)); "
    code = limit + "from cli.main import main; raise SystemExit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", "import sys; " + code, *PREDICT, "-o", str(old)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    assert p.returncode == 2, p.stderr
    line = only_line(p.stderr)
    assert str(old) in line and os.strerror(errno.EFBIG) in line and ".tmp" not in line
    assert old.read_text() == "the previous table\n"
    assert os.listdir(tmp_path) == ["table.md"]


@pytest.mark.parametrize("verb", [
    ["lower", "qwen3-0.6b", "--format", "summary", "-o"],
    ["place", "qwen3-0.6b", "--split", "layer", "-o"],
    ["nodes", "qwen3-0.6b", "-o"],
    ["show", "qwen3-0.6b", "--split", "layer", "--format", "dot", "-o"],
    ["timeline", "qwen3-0.6b", "-o"],
    ["predict", "qwen3-0.6b", "--ctx", "4096", "--plot"],
])
def test_every_verb_streams_into_a_device(verb: list[str], tmp_path: Path) -> None:
    full = char_device(tmp_path / "full.csv", 7)  # timeline and --plot pick the format by extension
    if verb[-1] == "--plot":
        full = tmp_path / "full.png"
        full.symlink_to(tmp_path / "full.csv")
    assert main([*verb, str(full)]) == 2
    assert os.lstat(tmp_path / "full.csv").st_rdev == os.makedev(1, 7)
    assert stat.S_ISCHR(os.lstat(tmp_path / "full.csv").st_mode)
