"""A rank stops (checkpoint, exit 0) when the ``deepspeed`` launcher that started it is gone.

What DeepSpeed 0.19 does with signals on one node (``deepspeed.launcher.runner`` and
``deepspeed.launcher.launch``):

* ``deepspeed`` (the runner) starts ``python -m deepspeed.launcher.launch`` and waits on it. It
  installs no signal handler (only the multi-node pdsh path does): SIGTERM kills it at once, SIGINT
  ends it with a KeyboardInterrupt, and nothing is passed on.
* ``launch.py`` starts the ranks; on SIGTERM or SIGINT to itself it sends SIGTERM to every rank's
  process tree, waits up to 30 s, then SIGKILLs them. It does not watch its own parent, so when the
  runner dies it and the ranks keep training as orphans.

So a SIGTERM from a scheduler or container runtime to the process it started (the runner) never
reaches the ranks. :func:`watch_launcher` closes that gap from inside each rank: when the rank's
parent is ``deepspeed.launcher.launch`` it remembers that process and its parent (the runner, or
whatever started ``launch.py``: a pdsh/ssh session on other nodes), each with its start time, and a
daemon thread polls them every second. When either is gone (or ``launch.py`` was re-parented), the
rank sends SIGTERM to itself, so the trainer's handler (installed in ``Trainer.setup``) finishes
the step, saves a checkpoint on every rank together and exits 0. Before the handler is installed
(start-up), SIGTERM ends the rank at once: nothing was trained yet.

:func:`forward_sigint_once` makes the first SIGINT (Ctrl-C reaches the whole foreground process
group) act like SIGTERM; a second one interrupts at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import psutil

POLL_S = 1.0
LAUNCH_MODULE = "deepspeed.launcher.launch"


def _is_deepspeed_launch(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return LAUNCH_MODULE in cmdline or any(part.endswith("deepspeed/launcher/launch.py") for part in cmdline)


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (``is_running`` also compares start times: a reused pid is not it)."""
    return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE


class LauncherWatch:
    """Polls the rank's ``launch.py`` parent and its parent; SIGTERMs this process once when one is gone."""

    def __init__(self, launch: psutil.Process, runner: psutil.Process | None, poll_s: float = POLL_S):
        self.launch, self.runner, self.poll_s = launch, runner, poll_s
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="align-pro-launcher-watch", daemon=True)

    def start(self) -> LauncherWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def gone(self) -> str | None:
        """What disappeared, or None while the launcher processes live."""
        try:
            # A dead parent's children are re-parented at once (the ppid check), even while the
            # dead process is still a zombie that its own parent has not reaped (is_running is True).
            if not _alive(self.launch) or os.getppid() != self.launch.pid:
                return f"DeepSpeed's launch process (pid {self.launch.pid}) is gone"
            if self.runner is not None and (not _alive(self.runner) or self.launch.ppid() != self.runner.pid):
                return f"the deepspeed launcher (pid {self.runner.pid}) is gone"
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return f"DeepSpeed's launch process (pid {self.launch.pid}) is gone"
        except psutil.Error:  # cannot tell (access denied): keep training
            return None
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            reason = self.gone()
            if reason is None:
                continue
            self.fired = reason
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:
                print(
                    f"align-pro: {reason}; stopping: checkpoint after this step, then exit",
                    file=sys.stderr,
                    flush=True,
                )
            os.kill(os.getpid(), signal.SIGTERM)
            return


def watch_launcher(poll_s: float = POLL_S) -> LauncherWatch | None:
    """Start watching this rank's DeepSpeed launcher processes; None when the parent is not
    ``deepspeed.launcher.launch`` (a plain ``python launch/pretrain.py``, a Ray Train worker)."""
    try:
        launch = psutil.Process(os.getppid())
    except psutil.NoSuchProcess:
        return None
    if not _is_deepspeed_launch(launch):
        return None
    try:
        runner = launch.parent()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        runner = None
    if runner is not None and runner.pid <= 1:
        runner = None  # launch.py started by init itself (or already orphaned): watch launch.py alone
    return LauncherWatch(launch, runner, poll_s).start()


def forward_sigint_once() -> None:
    """First SIGINT: send ourselves SIGTERM (graceful stop and checkpoint); a second SIGINT raises
    KeyboardInterrupt as usual. Call from the main thread."""

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGINT, on_sigint)
