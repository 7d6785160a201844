"""simpo.runfiles: the output-folder lock, torn JSONL tails, atomic rewrites, disk-full errors."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simpo import runfiles
from simpo.metrics import MetricsWriter
from simpo.runfiles import (
    FolderInUseError,
    WriteError,
    hold_folder,
    release_folders,
    restart_jsonl,
    write_failure,
)

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from simpo.runfiles import hold_folder
hold_folder(sys.argv[1], "train.output_dir")
print("held", flush=True)
time.sleep(60)
"""


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torn_last_line_is_dropped_at_resume(tmp_path, capsys):
    """A crash or full disk mid-append leaves half a line: resume drops it, says so, and keeps
    the steps up to the checkpoint (it used to die on json.loads)."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')
    writer = MetricsWriter(path, enabled=True, resume_step=2)
    assert [r["step"] for r in records(path)] == [1, 2]
    assert "dropped an incomplete last line" in capsys.readouterr().out
    writer.write({"step": 3, "loss": 0.25})
    assert [r["step"] for r in records(path)] == [1, 2, 3]


def test_resume_rewrites_the_log_atomically(tmp_path):
    """The rewrite goes to a new file renamed over the old one: a reader (or a crash) sees
    the old or the new file whole, never a truncated one."""
    path = tmp_path / "metrics.jsonl"
    old = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    path.write_text(old)
    with open(path) as before:  # the old file, as a concurrent reader holds it
        MetricsWriter(path, enabled=True, resume_step=1)
        assert before.read() == old  # in-place rewriting would have truncated it
    assert [r["step"] for r in records(path)] == [1]
    assert not list(tmp_path.glob(".*tmp"))


def test_unreadable_lines_inside_the_log_are_named(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\nnot json\n\xff\xfe\n[1, 2]\n{"step": 2}\n')
    notes = restart_jsonl(path, keep=lambda r: True)
    assert notes == [f"{path}: dropped 3 unreadable line(s): [2, 3, 4]"]
    assert records(path) == [{"step": 1}, {"step": 2}]
    assert restart_jsonl(path, keep=None) == [] and path.read_text() == ""  # a fresh run


def test_a_full_disk_names_the_file_and_the_free_space(tmp_path):
    """Appending to a full disk (/dev/full answers ENOSPC) is a one-line error naming the
    path, 'disk full' and the free space, not a bare OSError."""
    writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True, resume_step=None)
    writer.path = Path("/dev/full")
    with pytest.raises(WriteError, match=r"cannot write /dev/full: disk full \(.* [MG]iB free on "):
        writer.write({"step": 1})
    big = write_failure(tmp_path / "x", OSError(27, "File too large"))
    assert "file too large (file-size limit" in str(big) and str(tmp_path / "x") in str(big)
    odd = write_failure(tmp_path / "y", RuntimeError("[enforce fail] unexpected pos 704 vs 598"))
    said = r"iB free on /[^)]*\); the writer said: \[enforce fail\] unexpected pos 704 vs 598$"
    assert re.search(said, str(odd)), str(odd)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_blocks_and_a_dead_ones_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by another run \(pid {proc.pid} on"):
            hold_folder(tmp_path, "train.output_dir")
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding the lock: no cleanup ran
        proc.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid  # stale content
    lock = hold_folder(tmp_path, "train.output_dir")  # the kernel dropped the dead one's flock
    try:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert hold_folder(tmp_path, "train.output_dir") is lock  # re-entrant in one process
    finally:
        release_folders()
    assert (tmp_path / ".lock").read_text() == ""  # released: empty, never deleted


def test_a_holder_on_another_host_counts_until_its_heartbeat_stops(tmp_path):
    """On shared storage whose locks do not cross hosts, the lock file's heartbeat decides."""
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": "node-7" + socket.gethostname(), "pid": 4242}))
    with pytest.raises(FolderInUseError, match=r"pid 4242 on host node-7.*alive 0 s ago"):
        hold_folder(tmp_path, "--out")
    old = time.time() - runfiles.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    try:
        hold_folder(tmp_path, "--out")
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    finally:
        release_folders()


def test_without_file_locks_a_live_pid_on_this_host_still_counts(tmp_path, monkeypatch):
    """Some file systems refuse flock (ENOLCK): the lock file's pid and start time decide."""

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runfiles.fcntl, "flock", no_locks)
    proc = _holder(tmp_path / "other")  # a live process, to name in the lock file
    try:
        live = {
            "host": socket.gethostname(),
            "pid": proc.pid,
            "start": runfiles._start_time(proc.pid),
        }
        (tmp_path / ".lock").write_text(json.dumps(live))
        with pytest.raises(FolderInUseError, match=rf"pid {proc.pid} on host"):
            hold_folder(tmp_path, "train.output_dir")
        (tmp_path / ".lock").write_text(json.dumps(live | {"start": "1"}))  # pid reused
        hold_folder(tmp_path, "train.output_dir")
    finally:
        release_folders()
        proc.kill()
        proc.wait()
