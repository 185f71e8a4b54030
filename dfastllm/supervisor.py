"""`dfastllm serve`: the supervisor process. Imports no torch.

It owns what outlives any one engine or worker:
- the shared-memory segments (the IPC layout and the HTTP workers'
  rate-limit table, created at start under a fresh base name, removed at
  stop; a crashed run's leftovers are removed at the next start),
- the Prometheus multiprocess directory (a fresh temporary folder),
- the engine process: started as a fresh interpreter
  (`python -m dfastllm.engine.process`), restarted after a crash with
  exponential backoff while the control block says FAILED, given up after
  `engine_restart_limit` consecutive crashes that never reached READY, or at
  once when the engine exits with EXIT_PERMANENT_FAILURE (a bad checkpoint
  or setting: its message is logged, no restart can help); a ready engine
  whose loop has not come round for `engine_stall_timeout_s` (hung, or
  stopped) is killed, and restarted as after a crash,
- Granian (`python -m server.launch`, the command
  `server.launch.granian_argv` builds), whose master process respawns its
  own workers (they end with it, see `dfastllm.lifetime`): restarted
  after it exits with the same backoff, given up after HTTP_RESTART_LIMIT
  exits in a row that each came within HTTP_STABLE_S of its start (a port
  taken by someone else, a broken setting).

Every child gets the configuration and the names in its environment:
DFASTLLM_CONFIG_JSON, DFASTLLM_IPC_NAME, PROMETHEUS_MULTIPROC_DIR.

SIGTERM or SIGINT stops cleanly: the supervisor marks the engine DRAINING
in the control block (readiness drops at once, the workers refuse new
generations), the engine drains (it admits nothing new, running requests
finish for up to drain_timeout_s), then Granian stops, then the segments and
the metrics folder are removed. Exit 0 only if every child exited 0 too.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from dfastllm.config import CONFIG_ENV, ServerConfig
from dfastllm.engine.process import EXIT_PERMANENT_FAILURE, FAILURE_FILE_ENV
from dfastllm.ipc import EngineState, IpcLayout, new_base_name, remove_stale_segments
from dfastllm.ipc.rate_limit import RateLimitTable
from dfastllm.ipc.rate_limit import segment_name as rate_limit_segment
from dfastllm.lifetime import die_with_parent

logger = logging.getLogger("dfastllm.supervisor")

MONITOR_INTERVAL_S = 0.05
RESTART_BACKOFF_S = 0.5  # first delay; doubles with every crash before READY
RESTART_BACKOFF_MAX_S = 30.0
HTTP_STOP_TIMEOUT_S = 20.0  # Granian gives its workers 15 s to end their streams
KILL_GRACE_S = 5.0  # after a timeout, how long SIGKILL may take
HTTP_STABLE_S = 10.0  # Granian that ran this long before exiting did start
HTTP_RESTART_LIMIT = 5  # exits in a row within HTTP_STABLE_S of the start


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
        self.config = config
        self.http = http  # False: engine only (tests, benchmarks)
        self.layout: IpcLayout | None = None
        self.rate_limits: RateLimitTable | None = None  # the HTTP workers' shared counters
        self.metrics_dir: str | None = None
        self.failure_file: str | None = None  # where an engine says why it cannot ever start
        self.failure_message: str | None = None
        self.env: dict[str, str] = {}
        self.engine: subprocess.Popen | None = None
        self.granian: subprocess.Popen | None = None
        self.stop_requested = threading.Event()
        self.engine_starts = 0
        self._failures_before_ready = 0
        self._engine_reached_ready = False
        self._restart_at: float | None = None
        self.http_starts = 0
        self._http_started_at = 0.0
        self._http_quick_exits = 0  # in a row, each within HTTP_STABLE_S of its start
        self._http_restart_at: float | None = None

    # ---- start --------------------------------------------------------------------
    def start(self) -> None:
        removed = remove_stale_segments()
        if removed:
            logger.info("removed shared-memory segments of a crashed run", extra={"segments": removed})
        self.metrics_dir = tempfile.mkdtemp(prefix="dfastllm-metrics-")
        self.layout = IpcLayout.create(new_base_name(), n_slots=2 * self.config.workers,
                                       config=self.config.to_json().encode())
        self.rate_limits = RateLimitTable.create(rate_limit_segment(self.layout.base_name))
        self.failure_file = os.path.join(tempfile.mkdtemp(prefix="dfastllm-engine-"), "failure")
        self.env = {**os.environ, CONFIG_ENV: self.config.to_json(), **self.layout.env(),
                    "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir, FAILURE_FILE_ENV: self.failure_file}
        self.start_engine()
        if self.http:
            self.start_http()

    def start_engine(self) -> None:
        self.engine_starts += 1
        self._engine_reached_ready = False
        self.engine = subprocess.Popen([sys.executable, "-m", "dfastllm.engine.process"], env=self.env,
                                       preexec_fn=_child_setup)
        logger.info("engine process started", extra={"engine_pid": self.engine.pid, "start": self.engine_starts})

    def start_http(self) -> None:
        from server.launch import run_granian

        c = self.config
        self.http_starts += 1
        self._http_started_at = time.monotonic()
        self.granian = run_granian(c, self.env, preexec_fn=_child_setup)
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
        control = self.layout.control
        if self.engine is not None:
            if not self._engine_reached_ready and control.state == EngineState.READY:
                self._engine_reached_ready = True
                self._failures_before_ready = 0
                logger.info("engine ready", extra={"generation": control.generation})
            code = self.engine.poll()
            if code is None and self._stalled():
                self.engine.kill()  # then restarted as after a crash; its requests fail with its generation
                code = self.engine.wait()
            if code == EXIT_PERMANENT_FAILURE:
                self.failure_message = self._read_failure()
                logger.error("the engine cannot start; not restarting it: %s", self.failure_message)
                self.engine = None
                return False
            if code is not None:
                self._engine_died(code)
                if self._failures_before_ready >= self.config.engine_restart_limit:
                    logger.error("the engine failed %d times in a row before becoming ready; giving up",
                                 self._failures_before_ready)
                    return False
        if self.engine is None and self._restart_at is not None and time.monotonic() >= self._restart_at:
            self._restart_at = None
            self.start_engine()
        if self.granian is not None and self.granian.poll() is not None:
            if not self._http_died():
                return False
        if self.granian is None and self._http_restart_at is not None and time.monotonic() >= self._http_restart_at:
            self._http_restart_at = None
            self.start_http()
        return True

    def _http_died(self) -> bool:
        """Schedule Granian's restart; False when it keeps exiting as soon as it starts."""
        code, self.granian = self.granian.returncode, None
        ran_s = time.monotonic() - self._http_started_at
        self._http_quick_exits = self._http_quick_exits + 1 if ran_s < HTTP_STABLE_S else 0
        if self._http_quick_exits >= HTTP_RESTART_LIMIT:
            logger.error("the HTTP server exited %d times in a row right after starting; giving up",
                         self._http_quick_exits, extra={"exit_code": code})
            return False
        delay = min(RESTART_BACKOFF_S * 2 ** self._http_quick_exits, RESTART_BACKOFF_MAX_S)
        self._http_restart_at = time.monotonic() + delay
        logger.error("the HTTP server exited; restarting", extra={"exit_code": code, "ran_s": round(ran_s, 1),
                                                                   "restart_in_s": delay})
        return True

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

    def _read_failure(self) -> str:
        try:
            with open(self.failure_file, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return "(the engine left no message)"

    def _engine_died(self, code: int) -> None:
        pid = self.engine.pid
        self.engine = None
        self.layout.control.set_state(EngineState.FAILED)  # workers fail their open requests now
        self._mark_metrics_dead(pid)
        if not self._engine_reached_ready:
            self._failures_before_ready += 1
        delay = min(RESTART_BACKOFF_S * 2 ** self._failures_before_ready, RESTART_BACKOFF_MAX_S)
        self._restart_at = time.monotonic() + delay
        logger.error("the engine process exited; restarting", extra={
            "engine_pid": pid, "exit_code": code, "restart_in_s": delay,
            "failures_before_ready": self._failures_before_ready})

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
        for folder in (self.metrics_dir, self.failure_file and os.path.dirname(self.failure_file)):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self.metrics_dir = self.failure_file = None
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
    """`dfastllm serve`: supervise until a signal; returns the exit code."""
    from dfastllm.log import configure_logging

    configure_logging("supervisor", level=config.log_level, fmt=config.log_format)
    supervisor = Supervisor(config)
    try:
        supervisor.start()
    except BaseException:
        supervisor.stop()
        raise
    return supervisor.run()
