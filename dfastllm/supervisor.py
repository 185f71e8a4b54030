"""`dfastllm serve`: the supervisor process. Imports no torch.

It owns what outlives any one engine or worker:
- the shared-memory segments (the IPC layout and the HTTP workers'
  rate-limit table, created at start under a fresh base name, removed at
  stop; a crashed run's leftovers are removed at the next start, and if the
  supervisor is killed its children remove them as they exit),
- the Prometheus multiprocess directory (a fresh temporary folder),
- the engine process (`python -m dfastllm.engine.process`) and Granian
  (`python -m server.launch`, the command `server.launch.granian_argv`
  builds, whose master process respawns its own workers; they end with it,
  see `dfastllm.lifetime`). Each is restarted after it exits, with
  exponential backoff, by one `RestartPolicy` each: the engine's counts the
  exits before it became READY and gives up after `load_retries` of them
  in a row; Granian's counts the exits within HTTP_STABLE_S of its start
  and gives up after HTTP_RETRIES. A child that exits EXIT_CANNOT_START
  (a bad checkpoint or setting, the wrong copy of the package) is not
  restarted: its message is logged and the supervisor stops. A ready engine
  whose loop has not come round for `engine_stall_timeout_s` (hung,
  stopped) is killed, and restarted as after a crash.

Before any child starts, it checks what would make every child fail: the
compiled modules load, and the HTTP port is free (CannotStart, one line).

Every child runs in the folder that holds the supervisor's own `dfastllm`
and `server` packages, so it imports the same code wherever the user
stands (in a source checkout the current folder would otherwise come first
on the child's sys.path, with a `dfastllm/` that has no compiled modules);
relative paths of the configuration were made absolute for it. Its
environment carries the configuration and the names: DFASTLLM_CONFIG_JSON,
DFASTLLM_IPC_NAME, PROMETHEUS_MULTIPROC_DIR, and those of dfastllm.lifetime.

SIGTERM or SIGINT stops cleanly: the supervisor marks the engine DRAINING
in the control block (readiness drops at once, the workers refuse new
generations), the engine drains (it admits nothing new, running requests
finish for up to drain_timeout_s), then Granian stops, then the segments and
the metrics folder are removed. Exit 0 only if every child exited 0 too.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import dfastllm
from dfastllm.config import CONFIG_ENV, ServerConfig
from dfastllm.ipc import EngineState, IpcLayout, new_base_name, remove_stale_segments
from dfastllm.ipc.rate_limit import RateLimitTable
from dfastllm.ipc.rate_limit import segment_name as rate_limit_segment
from dfastllm.lifetime import (EXIT_CANNOT_START, FAILURE_FILE_ENV, PACKAGE_ROOT_ENV, SUPERVISOR_PID_ENV,
                               die_with_parent)

logger = logging.getLogger("dfastllm.supervisor")

MONITOR_INTERVAL_S = 0.05
RESTART_BACKOFF_S = 0.5  # first delay; doubles with every failure in a row
RESTART_BACKOFF_MAX_S = 30.0
HTTP_STOP_TIMEOUT_S = 20.0  # Granian gives its workers 15 s to end their streams
KILL_GRACE_S = 5.0  # after a timeout, how long SIGKILL may take
HTTP_STABLE_S = 10.0  # Granian that ran this long before exiting did start
HTTP_RETRIES = 4  # restarts after exits in a row within HTTP_STABLE_S of the start


class CannotStart(RuntimeError):
    """A mistake found before any child starts (a taken port, a broken
    build); the message says what and how to fix it."""


@dataclasses.dataclass
class RestartPolicy:
    """When a supervised child that exited starts again: after a backoff
    that doubles with each failure in a row, and never after more than
    `retries` failures in a row. What counts as a failure is the caller's;
    any other exit starts the count afresh."""

    retries: int
    failures: int = 0
    restart_at: float | None = None

    def exited(self, *, failed: bool, now: float) -> float | None:
        """Schedule the restart; -> its delay in seconds, or None: give up."""
        self.failures = self.failures + 1 if failed else 0
        if self.failures > self.retries:
            return None
        delay = min(RESTART_BACKOFF_S * 2 ** self.failures, RESTART_BACKOFF_MAX_S)
        self.restart_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0

    def due(self, now: float) -> bool:
        """True once, when the scheduled restart's time has come."""
        if self.restart_at is None or now < self.restart_at:
            return False
        self.restart_at = None
        return True


def package_root() -> str:
    """The folder holding the `dfastllm` (and `server`) package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.abspath(dfastllm.__file__)))


def check_port_free(host: str, port: int) -> None:
    """CannotStart if nothing could listen on host:port (taken, or not an
    address of this machine), found before Granian tries five times."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise CannotStart(f"{host}:{port} is already in use (another server?); stop it or choose "
                                  "another --port") from None
            raise CannotStart(f"cannot listen on {host}:{port}: {error.strerror}; check --host") from None


def _child_setup() -> None:
    """preexec_fn of the engine and Granian. A session of its own: a
    terminal's Ctrl-C reaches only the supervisor, which then stops the
    children in order (the engine drains before Granian stops streaming).
    And SIGTERM when the supervisor dies, even by SIGKILL, so no child
    outlives the run that owns its segments."""
    os.setsid()
    die_with_parent()


class Supervisor:
    """`start()`, then `run()` until a signal. Tests drive the parts:
    `start()`, `wait_ready()`, `supervise()` in a thread, `stop()`."""

    def __init__(self, config: ServerConfig, *, http: bool = True) -> None:
        self.config = config.with_absolute_paths()  # the children run elsewhere
        self.http = http  # False: engine only (tests, benchmarks)
        self.root = package_root()
        self.layout: IpcLayout | None = None
        self.rate_limits: RateLimitTable | None = None  # the HTTP workers' shared counters
        self.metrics_dir: str | None = None
        self.failure_dir: str | None = None  # where a child says why it cannot ever start
        self.failure_message: str | None = None
        self.env: dict[str, str] = {}
        self.engine: subprocess.Popen | None = None
        self.granian: subprocess.Popen | None = None
        self.stop_requested = threading.Event()
        self.engine_starts = 0
        self.engine_restarts = RestartPolicy(retries=self.config.load_retries)  # failures: exits before READY
        self._engine_reached_ready = False
        self.http_starts = 0
        self.http_restarts = RestartPolicy(retries=HTTP_RETRIES)  # failures: exits within HTTP_STABLE_S
        self._http_started_at = 0.0

    # ---- start --------------------------------------------------------------------
    def start(self) -> None:
        """Check what would fail every child (CannotStart), then create the
        segments and start the engine and Granian."""
        try:
            dfastllm.load_extension("_C")  # the engine's kernels; a broken build fails here, not in a restart loop
        except dfastllm.ExtensionError as error:
            raise CannotStart(str(error)) from None
        if self.http:
            check_port_free(self.config.host, self.config.port)
        removed = remove_stale_segments()
        if removed:
            logger.info("removed shared-memory segments of a crashed run", extra={"segments": removed})
        self.metrics_dir = tempfile.mkdtemp(prefix="dfastllm-metrics-")
        self.failure_dir = tempfile.mkdtemp(prefix="dfastllm-failures-")
        self.layout = IpcLayout.create(new_base_name(), n_slots=2 * self.config.workers,
                                       config=self.config.to_json().encode())
        self.rate_limits = RateLimitTable.create(rate_limit_segment(self.layout.base_name))
        self.env = {**os.environ, CONFIG_ENV: self.config.to_json(), **self.layout.env(),
                    "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir, PACKAGE_ROOT_ENV: self.root,
                    SUPERVISOR_PID_ENV: str(os.getpid())}
        self.start_engine()
        if self.http:
            self.start_http()

    def _child_env(self, child: str) -> dict[str, str]:
        return {**self.env, FAILURE_FILE_ENV: os.path.join(self.failure_dir, child)}

    def start_engine(self) -> None:
        self.engine_starts += 1
        self._engine_reached_ready = False
        self.engine = subprocess.Popen([sys.executable, "-m", "dfastllm.engine.process"], cwd=self.root,
                                       env=self._child_env("engine"), preexec_fn=_child_setup)
        logger.info("engine process started", extra={"engine_pid": self.engine.pid, "start": self.engine_starts})

    def start_http(self) -> None:
        from server.launch import run_granian

        c = self.config
        self.http_starts += 1
        self._http_started_at = time.monotonic()
        self.granian = run_granian(c, self._child_env("http"), cwd=self.root, preexec_fn=_child_setup)
        logger.info("HTTP server started", extra={"granian_pid": self.granian.pid, "host": c.host, "port": c.port,
                                                  "workers": c.workers, "start": self.http_starts})

    # ---- watch --------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (-> clean stop, 0) or a failure we
        cannot recover from (-> 1); 1 as well when a child did not stop cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop_requested.set())
        try:
            code = self.supervise()
        finally:
            clean = self.stop()
        return code or (0 if clean else 1)

    def supervise(self) -> int:
        """The watch loop without signal handling or stop (a test runs it in
        a thread and sets `stop_requested`); 0 when asked to stop, 1 on failure."""
        while not self.stop_requested.wait(MONITOR_INTERVAL_S):
            if not self.poll():
                return 1
        return 0

    def poll(self) -> bool:
        """One supervision step; False when the server cannot go on."""
        control, now = self.layout.control, time.monotonic()
        if self.engine is not None:
            if not self._engine_reached_ready and control.state == EngineState.READY:
                self._engine_reached_ready = True
                self.engine_restarts.succeeded()
                logger.info("engine ready", extra={"generation": control.generation})
            code = self.engine.poll()
            if code is None and self._stalled():
                self.engine.kill()  # then restarted as after a crash; its requests fail with its generation
                code = self.engine.wait()
            if code is not None and not self._engine_died(code, now):
                return False
        if self.engine is None and self.engine_restarts.due(now):
            self.start_engine()
        if self.granian is not None and self.granian.poll() is not None and not self._http_died(now):
            return False
        if self.granian is None and self.http_restarts.due(now):
            self.start_http()
        return True

    def _engine_died(self, code: int, now: float) -> bool:
        """Schedule the engine's restart; False when it must not be restarted."""
        pid = self.engine.pid
        self.engine = None
        self.layout.control.set_state(EngineState.FAILED)  # workers fail their open requests now
        self._mark_metrics_dead(pid)
        if code == EXIT_CANNOT_START:
            return self._cannot_start("engine", "the engine cannot start")
        delay = self.engine_restarts.exited(failed=not self._engine_reached_ready, now=now)
        if delay is None:
            logger.error("the engine failed %d times in a row before becoming ready (--load-retries %d); "
                         "giving up", self.engine_restarts.failures, self.config.load_retries)
            return False
        logger.error("the engine process exited; restarting", extra={
            "engine_pid": pid, "exit_code": code, "restart_in_s": delay,
            "failures_before_ready": self.engine_restarts.failures})
        return True

    def _http_died(self, now: float) -> bool:
        """Schedule Granian's restart; False when it must not be restarted."""
        code, self.granian = self.granian.returncode, None
        if code == EXIT_CANNOT_START:
            return self._cannot_start("http", "the HTTP server cannot start")
        ran_s = now - self._http_started_at
        delay = self.http_restarts.exited(failed=ran_s < HTTP_STABLE_S, now=now)
        if delay is None:
            logger.error("the HTTP server exited %d times in a row right after starting; giving up",
                         self.http_restarts.failures, extra={"exit_code": code})
            return False
        logger.error("the HTTP server exited; restarting", extra={"exit_code": code, "ran_s": round(ran_s, 1),
                                                                   "restart_in_s": delay})
        return True

    def _cannot_start(self, child: str, what: str) -> bool:
        try:
            with open(os.path.join(self.failure_dir, child), encoding="utf-8") as f:
                self.failure_message = f.read()
        except FileNotFoundError:
            self.failure_message = "(it left no message)"
        logger.error("%s; not restarting it: %s", what, self.failure_message)
        return False

    def _stalled(self) -> bool:
        """A ready engine whose loop stopped coming round (hung, stopped).
        Before READY the loop has not started: loading and warm-up take as
        long as they take."""
        control, limit = self.layout.control, self.config.engine_stall_timeout_s
        if limit <= 0 or control.state not in (EngineState.READY, EngineState.DRAINING):
            return False
        age = control.loop_age()
        if age <= limit:
            return False
        logger.error("the engine loop has not come round for %.1f s; killing the engine", age,
                     extra={"engine_pid": self.engine.pid, "engine_stall_timeout_s": limit})
        return True

    def wait_ready(self, timeout: float) -> bool:
        """Supervise until the engine is READY (True) or the timeout (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.poll():
                return False
            if self._engine_reached_ready and self.engine is not None:
                return True
            time.sleep(MONITOR_INTERVAL_S)
        return False

    # ---- stop ---------------------------------------------------------------------
    def stop(self) -> bool:
        """Drain the engine, stop Granian, remove the segments and the metrics
        folder. Safe to call more than once. True if every child it stopped
        exited 0 (the engine drained in time, Granian closed its workers)."""
        exit_codes = {}
        if self.engine is not None:
            logger.info("draining the engine", extra={"drain_timeout_s": self.config.drain_timeout_s})
            if self.engine.poll() is None:
                # Readiness drops now, not when the engine's loop next looks at its signal.
                self.layout.control.set_state(EngineState.DRAINING)
            exit_codes["engine"] = _terminate(self.engine, self.config.drain_timeout_s + KILL_GRACE_S)
            self._mark_metrics_dead(self.engine.pid)
            self.engine = None
        if self.granian is not None:
            exit_codes["http"] = _terminate(self.granian, HTTP_STOP_TIMEOUT_S + KILL_GRACE_S)
            self.granian = None
        if self.layout is not None:
            self.layout.control.set_state(EngineState.STOPPED)
            self.layout.unlink()
            self.layout = None
        if self.rate_limits is not None:
            self.rate_limits.unlink()
            self.rate_limits = None
        for folder in (self.metrics_dir, self.failure_dir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self.metrics_dir = self.failure_dir = None
        clean = all(code == 0 for code in exit_codes.values())
        (logger.info if clean else logger.error)("stopped", extra={"exit_codes": exit_codes})
        return clean

    def _mark_metrics_dead(self, pid: int) -> None:
        """The engine's live gauges leave /metrics with it."""
        if self.metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)


def _terminate(process: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; -> the exit code (None
    if even SIGKILL did not end it in time)."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("process did not stop in time; killing it", extra={"pid": process.pid})
            process.kill()
    try:
        return process.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        return None


def serve(config: ServerConfig) -> int:
    """`dfastllm serve`: supervise until a signal; returns the exit code
    (2 for a mistake found before any child started)."""
    from dfastllm.log import configure_logging

    configure_logging("supervisor", level=config.log_level, fmt=config.log_format)
    supervisor = Supervisor(config)
    try:
        supervisor.start()
    except CannotStart as error:  # found before anything was created
        logger.error("%s", error)
        return 2
    except BaseException:
        supervisor.stop()
        raise
    return supervisor.run()
