"""Several server processes on one listening socket (``layershap serve --workers N``).

The parent has built the app and bound the socket; it forks ``workers`` children, each running uvicorn on the
shared socket, so the kernel hands each new connection to one of them and N requests run on N cores (one Python
process runs one request at a time). Forking after the imports makes a worker ready at once (no second import
of torch) and shares the loaded libraries' memory. A worker that dies is replaced; SIGTERM or SIGINT to the
parent stops every worker and returns once they are gone; a worker whose parent dies (even by SIGKILL) shuts
down too. Each worker keeps its own answer cache and loaded surrogates; answers are the same bytes whichever
worker computes them.

Example:
    >>> run_workers(lambda: uvicorn.Server(config).run(sockets=[sock]), workers=2)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from layershap.core.errors import LayershapError

log = logging.getLogger("layershap.serve")
QUICK_DEATH_S = 2.0  # a worker that dies this soon after its start counts towards giving up
MAX_QUICK_DEATHS = 5  # consecutive quick deaths: the workers cannot run at all (stop instead of a fork loop)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _worker(run: Callable[[], None], lifeline: int) -> None:
    """In a forked child: run the server; shut it down (SIGTERM to itself) when the parent's end of the
    lifeline closes, i.e. the parent is gone."""

    def watch() -> None:
        try:
            os.read(lifeline, 1)  # blocks until the parent exits (EOF)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="layershap-parent-watch", daemon=True).start()
    code = 0
    try:
        run()
    except BaseException:
        log.exception("server worker %d failed", os.getpid())
        code = 1
    finally:
        os._exit(code)


def run_workers(run: Callable[[], None], workers: int) -> int:
    """Run ``run()`` (one uvicorn server on the already bound socket) in ``workers`` forked processes and keep
    that many alive until SIGTERM/SIGINT; ``workers=1`` runs it in this process. Returns the exit status.
    """
    if workers < 1:
        raise LayershapError(f"--workers must be at least 1; got {workers}")
    if workers == 1:
        run()
        return 0
    if not hasattr(os, "fork"):
        raise LayershapError("--workers above 1 needs a system with fork() (Linux, macOS); use --workers 1")
    lifeline_read, lifeline_write = os.pipe()
    children: dict[int, float] = {}  # pid -> start time
    stopping = False

    def spawn() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # no parent handler may run in a fresh child
        try:
            pid = os.fork()
            if pid == 0:
                os.close(lifeline_write)
                for sig in STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own graceful handlers
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                _worker(run, lifeline_read)
            children[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if stopping:  # a stop signal came in while this one was being started
            os.kill(pid, signal.SIGTERM)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    quick_deaths, status = 0, 0
    try:
        for _ in range(workers):
            spawn()
        while children:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            started = children.pop(pid, None)
            if started is None or stopping:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH_S else 0
            if quick_deaths >= MAX_QUICK_DEATHS:
                log.error("server workers keep dying at start (last: %d, exit %d); stopping", pid, code)
                status = 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("server worker %d exited (%d); starting another", pid, code)
            spawn()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lifeline_write)
        os.close(lifeline_read)
    return status
