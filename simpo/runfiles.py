"""Files a run writes, made safe against crashes, full disks and a second run in the same folder.

- `hold_folder`: an output folder is used by one run at a time. The lock is `fcntl.flock` on
  `<folder>/.lock`, which the kernel drops when the holder dies (even on SIGKILL), so a dead
  run's lock is simply taken over; the file also names the holder (host, pid, start time) for
  the error message, and a heartbeat thread touches it every 30 s so that on a shared file
  system whose locks do not reach other hosts, a live run elsewhere still blocks (a silent
  one, > 2 minutes, is taken over); on one without locks at all, a holder on this host counts
  while its pid runs. The file is never deleted (deleting a flock'ed file lets two processes
  hold locks on different inodes); an empty file means "free".
- `write_atomic`: whole-file rewrites go to a temporary file that is fsynced and renamed over
  the old one: a crash leaves the old or the new file, never half of one.
- `append_line` / `restart_jsonl`: JSONL logs are append-only; at a restart an incomplete last
  line (crash or full disk mid-append) is dropped and said so, records after the resumed step
  too, and the rest is rewritten atomically.
- `WriteError`: a failed write names the path, the reason (disk full, quota, file-size limit)
  and the free space, in one line.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import resource
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK = ".lock"
HEARTBEAT_S = 30.0  # the holder touches the lock file this often
STALE_AFTER_S = 120.0  # a holder on another host silent this long is taken to be dead
_DISK_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
_DISK_FULL[errno.EFBIG] = "file too large (file-size limit, ulimit -f)"


class WriteError(RuntimeError):
    """A file of the run could not be written; the message names it and the free space."""


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _existing(path: str | Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_space(path: str | Path) -> str:
    """'12.3 GiB free on /mnt' for the file system (named by its mount point) holding `path`."""
    p = _existing(path)
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    amount = f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
    return f"{amount} free on {p}"


def _likely_cause(path: str | Path) -> str:
    """For a write that failed without saying why (torch's writer reports 'unexpected pos')."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"the file-size limit (ulimit -f) is {limit} bytes"
    try:
        if shutil.disk_usage(_existing(path)).free < 2**30:
            return "disk full"
    except OSError:
        pass
    return "write failed (a full disk or a quota is the usual cause)"


def write_failure(path: str | Path, e: BaseException) -> WriteError:
    """A one-line WriteError for a failed write of `path`: the cause, the free space, and the
    original error when it did not say why (torch's writer: '... unexpected pos 704 vs 598')."""
    code = getattr(e, "errno", None)
    text = " ".join(str(e).split()) or type(e).__name__
    said = ""
    if code in _DISK_FULL:
        why = _DISK_FULL[code]
    elif any(s in text for s in ("No space left", "StorageFull", "Disk quota")):
        why = "disk full"
    elif any(s in text for s in ("File too large", "FileTooLarge")):
        why = _DISK_FULL[errno.EFBIG]
    elif isinstance(e, OSError) and e.strerror:
        why = e.strerror
    else:
        why, said = _likely_cause(path), f"; the writer said: {text[:200]}"
    return WriteError(f"cannot write {path}: {why} ({free_space(path)}){said}")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn any failure of the writes in the block into a one-line WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as e:
        raise write_failure(path, e) from e


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` by `data` all at once: temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, e) from e


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is atomic
    finally:
        os.close(fd)


def append_line(path: str | Path, line: str) -> None:
    """Append `line` and a newline in one write (a crash can tear only this last line)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise write_failure(path, e) from e


def restart_jsonl(path: str | Path, keep: Callable[[dict[str, Any]], bool] | None) -> list[str]:
    """Rewrite a JSONL log for a restart and return what was dropped, one note per problem.

    keep=None starts an empty log. Otherwise records for which `keep` is false are dropped
    (steps after the resumed checkpoint, to be redone), and so is a line that is not a
    complete JSON object: an incomplete last line is what a crash or a full disk mid-append
    leaves; anything else unreadable is named by line number.
    """
    path = Path(path)
    kept: list[str] = []
    notes: list[str] = []
    raw = path.read_bytes() if keep is not None and path.is_file() else b""
    lines = raw.split(b"\n")
    torn = lines.pop()  # after the last newline: b"" unless the last append was cut short
    if torn.strip():
        notes.append(f"{path}: dropped an incomplete last line (a crash or full disk mid-write)")
    bad = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            bad.append(n)
        elif keep(record):
            kept.append(line.decode("utf-8") + "\n")
    if bad:
        notes.append(f"{path}: dropped {len(bad)} unreadable line(s): {bad[:5]}")
    write_atomic(path, "".join(kept))
    return notes


# --- the output-folder lock -------------------------------------------------------------


@dataclass
class FolderLock:
    path: Path
    file: Any  # the open lock file: closing it drops the flock
    stop: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.stop.set()
        if self.file.closed:
            return
        try:
            self.file.seek(0)
            self.file.truncate()  # empty = free; the file stays (see the module docstring)
        except OSError:
            pass
        self.file.close()
        _HELD.pop(self.path, None)


_HELD: dict[Path, FolderLock] = {}


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart), or ''."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder named in a lock file (on this host) still runs: its pid exists and
    started when the file says (a reused pid does not count)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not holder.get("start") or _start_time(pid) == holder["start"]


def _heartbeat(lock: FolderLock) -> None:
    while not lock.stop.wait(HEARTBEAT_S):
        try:
            os.utime(lock.path)
        except OSError:
            pass


def hold_folder(folder: str | Path, name: str) -> FolderLock:
    """Lock `folder` for this process (re-entrant) or raise FolderInUseError naming the holder.

    `name` is what the user set, for the message (e.g. "train.output_dir"). Released by
    `release_folders` or when the process exits, however it exits.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK).resolve()
    if path in _HELD:
        return _HELD[path]
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the run)
    flocked = True
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            holder = _read_holder(path)
            f.close()
            raise FolderInUseError(_in_use(name, folder, path, holder)) from None
        flocked = False  # a file system without locks (ENOLCK, EOPNOTSUPP): the file decides
    holder = _read_holder(path)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
    if holder and holder.get("host") != me["host"]:
        age = time.time() - path.stat().st_mtime
        if age < STALE_AFTER_S:  # its flock may not reach us (per-host locks on shared storage)
            f.close()
            raise FolderInUseError(_in_use(name, folder, path, holder, age))
    elif holder and not flocked and _alive(holder):
        f.close()
        raise FolderInUseError(_in_use(name, folder, path, holder))
    f.seek(0)
    f.truncate()
    f.write(json.dumps(me | {"since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    f.flush()
    lock = FolderLock(path, f)
    _HELD[path] = lock
    threading.Thread(target=_heartbeat, args=(lock,), daemon=True, name="lock-heartbeat").start()
    return lock


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _in_use(name: str, folder: Path, path: Path, holder: dict, age: float | None = None) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    since = f", since {holder['since']}" if "since" in holder else ""
    beat = ""
    if age is not None:  # another host: only its heartbeat tells whether it still runs
        beat = f", alive {age:.0f} s ago; if it died, retry after {STALE_AFTER_S:.0f} s"
    return (
        f"{name} = '{folder}' is in use by another run ({who}{since}{beat}; lock file {path}): "
        f"wait for it to finish, or choose another {name}"
    )


def release_folders() -> None:
    """Release every folder lock this process holds."""
    for lock in list(_HELD.values()):
        lock.release()
