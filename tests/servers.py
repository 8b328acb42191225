"""Processes that tests leave running while they work (the moto server, Ray heads and nodes, jobs),
tied to the test process: when pytest dies, even by SIGKILL (a time limit on `make test`), they go
with it. Before, a Ray head a killed run had started kept running for 20+ minutes.

``start`` is ``subprocess.Popen`` in a session of its own plus a guard: this file run as a script,
which the kernel sends SIGTERM when the test process dies (``prctl(PR_SET_PDEATHSIG)``) and which
then ends the command's whole session. The session, not just the process: `ray start --block`
drains for up to 30 s on SIGTERM before it stops its processes, and when it is killed outright its
grandchildren (the dashboard and runtime-env agents) live on; an autoscaler's fake nodes leave its
process group but keep its session.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def session_pids(session: int) -> list[int]:
    """Pids of the live (not zombie) processes in ``session`` (Ray's workers and nodes keep the
    session of the process that started the head, though not always its process group)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # state, and field 6 of /proc/PID/stat: the session
            pids.append(int(stat.parent.name))
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_session(session: int, grace_s: float = 5.0) -> None:
    """SIGTERM to every process of ``session``, SIGKILL to those still there after ``grace_s``. Linux
    gives no new process a pid that is still a session id, so no other process is hit."""
    _signal_all(session_pids(session), signal.SIGTERM)
    deadline = time.time() + grace_s
    while session_pids(session) and time.time() < deadline:
        time.sleep(0.2)
    deadline += 10  # a process stuck in the kernel dies when it leaves it, if not within this
    while (pids := session_pids(session)) and time.time() < deadline:  # again: one may fork meanwhile
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.1)


def start(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)`` whose session ends when this
    process dies. Call it from the main thread: the kernel signals the guard when the thread that
    started it ends, not the process."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    # a session of its own too: a Ctrl-C to pytest's process group must not end the guard first
    subprocess.Popen([sys.executable, __file__, str(proc.pid), str(os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc


def _guard(session: int, parent: int) -> None:
    """Until ``session`` is gone (its test stopped it): when ``parent`` dies, end the session."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken below, not by a handler
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    # the test is gone: nothing to stop gracefully for, and the next run may start soon
    if os.getppid() != parent:  # it died before the guard was set
        stop_session(session, grace_s=1.0)
        return
    while session_pids(session):
        if signal.sigtimedwait({signal.SIGTERM}, 2.0):
            stop_session(session, grace_s=1.0)
            return


if __name__ == "__main__":
    _guard(int(sys.argv[1]), int(sys.argv[2]))
