"""One live run per run directory: an owner lock file with a heartbeat.

``RUN/run.lock`` holds the owner (host, boot id, PID namespace, pid, the pid's start time, when
it took the lock, a random run id). It is created atomically (``O_CREAT | O_EXCL``, atomic on
local file systems and on NFS v3+), so of two launches exactly one creates it; the other is
refused with :class:`RunDirBusy`, whose message is one line naming the owner. While the run lives a
daemon thread touches the file every few seconds (its mtime is the heartbeat).

The lock never stays stuck after a crash (every process SIGKILLed, the machine lost). A launch
takes it over when its owner is provably dead:

* same host, boot and PID namespace, and the pid is gone or now belongs to a process started at
  another time (pid reuse);
* same host but another boot (the machine restarted);
* or its heartbeat is older than the stale timeout: ``ALIGN_PRO_LOCK_STALE_S`` seconds, default
  :data:`DEFAULT_STALE_S` (60). This is the only rule for an owner on another machine sharing the
  run directory; it compares the file's mtime (the file server's clock on NFS) with this
  machine's clock, so keep clocks in sync (NTP) or raise the timeout.

A takeover renames the dead owner's file aside (atomic; of two launches taking over at once only one
rename succeeds) and checks that what it moved is the record it judged dead before creating its own.

With ``train.remote_dir`` the owner is also recorded in ``<remote_dir>/run.lock``, rewritten with
a ``heartbeat`` time every quarter of the stale timeout, and a launch is refused while a live
owner's record is there. This is best effort: object stores reached through fsspec have no
atomic create-if-absent, so two launches on different machines within a second or so of each
other can both write their record (each warns when it later finds the other's).

In a DeepSpeed run only global rank 0 takes the lock (before the process group starts); every rank
learns the verdict through :func:`agree_refused`, one all-reduce right after the group starts, so
refused ranks all exit with code 2 instead of waiting in a collective. The Ray Train job takes it
in its driver.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
STALE_ENV = "ALIGN_PRO_LOCK_STALE_S"
DEFAULT_STALE_S = 60.0
_START_TOLERANCE_S = 0.05  # a pid whose start time differs by more is another process
_TAKEOVER_TRIES = 5


class RunDirBusy(RuntimeError):
    """Another live run owns the run directory; the message is one line naming the owner."""


def stale_timeout() -> float:
    """Seconds without a heartbeat after which a lock counts as abandoned (``ALIGN_PRO_LOCK_STALE_S``)."""
    raw = os.environ.get(STALE_ENV)
    if not raw:
        return DEFAULT_STALE_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STALE_ENV}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{STALE_ENV}={raw!r}: must be positive")
    return value


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def this_process() -> dict:
    """The owner record of the calling process (without ``run_id`` and ``since``)."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "pid": pid,
        "pid_start": _start_time(pid),
    }


def dead_reason(owner: dict, heartbeat_age: float, stale_s: float) -> str | None:
    """Why ``owner`` is provably dead (its lock may be taken over), or None while it may be alive."""
    me = this_process()
    if owner.get("host") == me["host"] and owner.get("boot_id") and me["boot_id"]:
        if owner["boot_id"] != me["boot_id"]:
            return "its machine has restarted since"
        if owner.get("pid_ns") == me["pid_ns"] and isinstance(owner.get("pid"), int):
            started = _start_time(owner["pid"])
            if started is None:
                return f"pid {owner['pid']} is gone"
            if owner.get("pid_start") is not None and abs(started - float(owner["pid_start"])) > _START_TOLERANCE_S:
                return f"pid {owner['pid']} now belongs to another process"
    if heartbeat_age > stale_s:
        return f"no heartbeat for {heartbeat_age:.0f} s (stale after {stale_s:g} s, {STALE_ENV})"
    return None


def describe(owner: dict) -> str:
    """``host H, pid P, since T`` (plus the run id) for messages."""
    if not owner:
        return "an owner whose lock file cannot be read"
    since = owner.get("since")
    when = datetime.fromtimestamp(since).astimezone().isoformat(timespec="seconds") if since else "?"
    return (
        f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since {when} (run id {owner.get('run_id', '?')})"
    )


def _read_lock(path: Path) -> tuple[dict, float] | None:
    """(owner record, mtime) of a lock file; None when there is none. A file being written right now
    (created, content not yet there) is re-read for a moment; unreadable after that: ``({}, mtime)``."""
    for _ in range(10):
        try:
            mtime = path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                return record, mtime
        except json.JSONDecodeError:
            pass
        time.sleep(0.1)
    return {}, mtime


class RunLock:
    """The owner lock of one run directory (and, best effort, of its ``train.remote_dir``).

    ``acquire()`` raises :class:`RunDirBusy` when a live run owns it; ``release()`` (idempotent)
    stops the heartbeat and removes the files that are still this run's.
    """

    def __init__(
        self,
        run_dir: str | Path,
        remote: str | None = None,
        stale_s: float | None = None,
        heartbeat_s: float | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.remote = remote or None
        self.stale_s = stale_timeout() if stale_s is None else float(stale_s)
        self.heartbeat_s = min(5.0, self.stale_s / 4) if heartbeat_s is None else float(heartbeat_s)
        self.run_id = uuid.uuid4().hex
        self.record: dict = {}
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    # ------------------------------------------------------------------ acquire
    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.record = {**this_process(), "since": time.time(), "run_id": self.run_id}
        for _ in range(_TAKEOVER_TRIES):
            if self._create():
                break
            found = _read_lock(self.path)
            if found is None:  # released between our create and our read
                continue
            owner, mtime = found
            if owner.get("run_id") == self.run_id:
                break
            reason = dead_reason(owner, time.time() - mtime, self.stale_s)
            if reason is None:
                raise RunDirBusy(self._busy_message(self.run_dir, owner, time.time() - mtime))
            self._take_over(owner, reason)
        else:
            raise RunDirBusy(f"{self.run_dir}: could not take {self.path} in {_TAKEOVER_TRIES} tries; retry")
        self.held = True
        try:
            self._claim_remote()
        except RunDirBusy:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="align-pro-run-lock", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Create the lock file with our record; False when it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(self.record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, owner: dict, reason: str) -> None:
        aside = self.path.with_name(f".{LOCK_NAME}.dead-{self.run_id}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another launch moved it first
            return
        moved = _read_lock(aside)
        if moved is not None and moved[0].get("run_id") != owner.get("run_id"):
            # Between our read and our rename another launch took the lock: give it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not self.path.exists():
                    os.rename(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        print(
            f"align-pro: taking over {self.path} from {describe(owner)}: {reason}",
            file=sys.stderr,
            flush=True,
        )

    @staticmethod
    def _busy_message(where, owner: dict, age: float) -> str:
        return (
            f"{where} is in use by another run: {describe(owner)}, last heartbeat {age:.0f} s ago; "
            "wait for it to end, stop it (SIGTERM), or use another --run-dir"
        )

    # ------------------------------------------------------------------ remote record (best effort)
    def _remote_url(self) -> str:
        from data_shards.storage import join

        return str(join(self.remote, LOCK_NAME))

    def _read_remote(self) -> dict | None:
        from data_shards import storage

        url = self._remote_url()
        if not storage.exists(url):
            return None
        try:
            record = json.loads(storage.read_text(url))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def _write_remote(self) -> None:
        from data_shards import storage

        storage.write_text(self._remote_url(), json.dumps({**self.record, "heartbeat": time.time()}))

    def _claim_remote(self) -> None:
        if not self.remote:
            return
        try:
            other = self._read_remote()
            if other is not None and other.get("run_id") != self.run_id:
                age = time.time() - float(other.get("heartbeat", 0))
                reason = dead_reason(other, age, self.stale_s)
                if reason is None:
                    raise RunDirBusy(self._busy_message(f"train.remote_dir {self.remote}", other, age))
                print(
                    f"align-pro: taking over the owner record {self._remote_url()} from {describe(other)}: {reason}",
                    file=sys.stderr,
                    flush=True,
                )
            self._write_remote()
        except (OSError, ValueError) as e:  # storage errors: the record is best effort
            log.warning("could not record the run's owner in %s: %s", self.remote, e)

    # ------------------------------------------------------------------ heartbeat
    def _beat(self) -> None:
        remote_every = max(self.heartbeat_s, self.stale_s / 4)
        last_remote = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._touch()
            except OSError as e:  # a heartbeat problem is reported, never fatal to the run
                log.warning("run lock heartbeat on %s failed: %s", self.path, e)
            if self.remote and time.monotonic() - last_remote >= remote_every:
                last_remote = time.monotonic()
                try:
                    other = self._read_remote()
                    if other is not None and other.get("run_id") != self.run_id:
                        self._warn_lost(f"train.remote_dir {self.remote}", other)
                    else:
                        self._write_remote()
                except (OSError, ValueError) as e:
                    log.warning("could not refresh the owner record in %s: %s", self.remote, e)

    def _touch(self) -> None:
        """Refresh the lock file's mtime; recreate it when it vanished; warn once when another run's is there."""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            if self._create():
                return
        self._still_ours()

    def _still_ours(self) -> bool:
        found = _read_lock(self.path)
        if found is not None and found[0].get("run_id") == self.run_id:
            return True
        self._warn_lost(str(self.path), found[0] if found else {})
        return False

    def _warn_lost(self, where: str, owner: dict) -> None:
        if not self._warned:
            self._warned = True
            print(
                f"align-pro: warning: {where} now names another run ({describe(owner)}); "
                "two runs may be writing to this run directory",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (and remote record) if they are still ours."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        found = _read_lock(self.path)
        if found is not None and found[0].get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)
        if self.remote:
            try:
                other = self._read_remote()
                if other is not None and other.get("run_id") == self.run_id:
                    from data_shards import storage

                    storage.remove_file(self._remote_url())
            except (OSError, ValueError) as e:
                log.warning("could not remove the owner record in %s: %s", self.remote, e)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def agree_refused(refused: bool) -> bool:
    """Collective, right after the process group starts: whether rank 0 (or any rank) was refused
    the run directory. Every rank gets the same answer, so a refused run exits on every rank."""
    import torch
    import torch.distributed as dist

    from pretrain.engine.collectives import all_reduce_numbers

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        # This is the run's first collective, before DeepSpeed picks each rank's GPU: without it every
        # rank of a node would reduce on cuda:0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return bool(all_reduce_numbers([int(refused)], op="max")[0])
