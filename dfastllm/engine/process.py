"""The engine process: `python -m dfastllm.engine.process`.

Started by the supervisor with the configuration in $DFASTLLM_CONFIG_JSON and
the IPC base name in $DFASTLLM_IPC_NAME. It attaches the shared segments the
supervisor created, loads the model (state LOADING), warms it up (WARMING:
a short generation of the common shapes, with the configured KV cache mode
and default block length, so the first request does not pay for lazy
initialisation; `--no-warmup` skips it), and then serves (READY) until
SIGTERM, which drains (DRAINING): new SUBMITs are refused, running requests
finish for up to drain_timeout_s, then exit 0.

A failure that a restart cannot cure (a bad checkpoint or configuration,
a compiled module that cannot load) ends the process with
EXIT_CANNOT_START and its message where the supervisor reads it
(`dfastllm.lifetime.cannot_start`), so the supervisor gives up at once with
that message instead of restarting; any other failure to load is logged in
one line (its traceback at debug level) and exits 1, and the supervisor
starts the engine again, up to `load_retries` times.

If the supervisor dies (even by SIGKILL), the parent-death signal stops the
engine like SIGTERM, and it removes the run's shared-memory segments as it
exits (the supervisor could not).

The loop (EngineCore does no IO; this wrapper owns the rings):
  1. follow the worker slots: a worker that left or died loses its requests;
  2. read every request ring: SUBMIT -> admit or REJECTED; CANCEL -> abort
     and CANCEL_ACK (see `router.py` for the protocol details);
  3. one EngineCore.step() when anything is unfinished; its outputs go to
     the owners' response rings as TOKENS / FINISHED / ERROR;
  4. flush response backlogs: a full ring is backpressure, never loss and
     never a blocked engine; a worker that stays full past a limit is
     treated as gone;
  5. publish load (queue depth, running, device memory) and the circuit
     breaker's state in the control block;
  6. idle: sleep on the engine doorbell (a futex every request-ring put
     rings), at most IDLE_WAIT_S so the periodic checks still run.

The heartbeat comes from a small thread, every HEARTBEAT_INTERVAL_S (0.1 s),
not from the loop: one denoising step of a large model may take longer than
the ENGINE_DEAD_AFTER_S (0.75 s) after which workers call the engine dead, and the heartbeat must say "this process is alive"
whatever the step length. A dead process (kill -9, crash) stops it at once.
A live process whose loop hangs (a stuck kernel, a deadlock, SIGSTOP) keeps
beating, so the loop also marks each round in the control block, and the
supervisor restarts an engine whose loop stops for engine_stall_timeout_s.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from dfastllm.checkpoints import one_line
from dfastllm.config import ServerConfig
from dfastllm.engine.router import Reply, RequestRouter
from dfastllm.ipc import EngineState, IpcLayout, remove_run_segments
from dfastllm.ipc.channels import Channel, WorkerChannels
from dfastllm.ipc.control import HEARTBEAT_INTERVAL_S
from dfastllm.lifetime import EXIT_CANNOT_START, report_cannot_start, supervisor_gone
from dfastllm.ipc.messages import Cancel, DecodeError, Error, RejectReason, Submit, decode, encode

logger = logging.getLogger("dfastllm.engine")

IDLE_WAIT_S = 0.25  # longest doorbell sleep: the periodic checks below still run
BACKLOG_WAIT_S = 0.005  # idle but a worker's ring is full: retry soon (no wake-up for space)
OWNER_CHECK_INTERVAL_S = 0.25  # probe worker pids (a syscall each)
DEVICE_MEMORY_INTERVAL_S = 2.0
WORKER_STALL_LIMIT_S = 10.0  # a response ring full this long without progress: the worker is gone
MAX_BACKLOG_MESSAGES = 65536  # or this many messages waiting for one worker

# Test hook: the first N model forwards after READY fail ("injected fault"),
# so that their steps fail as an out-of-memory would, to exercise the
# circuit breaker against a real engine (`inject_step_errors`). Never set
# in production.
FAULT_INJECT_ENV = "DFASTLLM_FAULT_INJECT_STEP_ERRORS"


class EngineProcess:
    """The loop around one EngineCore, serving the workers of one IPC layout."""

    def __init__(self, config: ServerConfig, layout: IpcLayout, core, metrics=None) -> None:
        self.config = config
        self.layout = layout
        self.control = layout.control
        self.core = core
        self.metrics = metrics
        self.channels = WorkerChannels(layout)
        self.router = RequestRouter(core, config, metrics=metrics)
        self._published_circuit: tuple | None = None
        self._published_prefix_cache = (0, 0)  # EngineStats' prefix cache counters at the last publish
        self.stop_requested = False  # set by SIGTERM
        self._drain_deadline: float | None = None
        self._stalled_since: dict[int, float] = {}
        self._config_version = self.control.config_version
        self._next_owner_check = 0.0
        self._next_memory_update = 0.0
        self._parent = os.getppid()

    # ---- the loop -------------------------------------------------------------
    def serve(self) -> int:
        """Run until drained (SIGTERM) or orphaned; returns the exit code."""
        self._discard_stale_requests()
        self._publish_circuit()  # a predecessor's OPEN is not ours
        self.control.loop_came_round()  # before READY: the supervisor's stall watch starts there
        self.control.set_state(EngineState.READY)
        logger.info("engine ready", extra={"slots": self.layout.n_slots})
        while True:
            now = time.monotonic()
            self.control.loop_came_round()
            if self.stop_requested and self._drain_deadline is None:
                self._begin_drain(now)
            if self._drain_deadline is not None and self._drained(now):
                return 0
            if now >= self._next_owner_check:
                self._next_owner_check = now + OWNER_CHECK_INTERVAL_S
                if os.getppid() != self._parent:
                    logger.error("the supervisor is gone; stopping")
                    return 1
                self._follow_workers(check_owners=True)
            else:
                self._follow_workers(check_owners=False)
            self._read_requests()
            if self.core.has_unfinished():
                self._deliver(self.router.step())
            backlog = self._flush(now)
            self._publish(now)
            if not self.core.has_unfinished():
                self.channels.wait(BACKLOG_WAIT_S if backlog else IDLE_WAIT_S)

    # ---- workers --------------------------------------------------------------
    def _follow_workers(self, *, check_owners: bool) -> None:
        attached, detached = self.channels.refresh(check_owners=check_owners)
        for channel in detached:
            dropped = self.router.drop_worker(channel.slot, "worker_gone")
            self._stalled_since.pop(channel.slot, None)
            logger.info("worker left", extra={"slot": channel.slot, "worker_pid": channel.pid,
                                               "requests_cancelled": len(dropped)})
        for channel in attached:
            logger.info("worker attached", extra={"slot": channel.slot, "worker_pid": channel.pid})

    def _read_requests(self) -> None:
        for channel, frame in self.channels.receive():
            try:
                msg = decode(frame)
            except DecodeError as error:
                logger.warning("undecodable frame from a worker: %s", error, extra={"slot": channel.slot})
                if error.request_id is not None:
                    self._deliver(self.router.reject(channel.slot, error.request_id, RejectReason.INVALID,
                                                     str(error)))
                continue
            if isinstance(msg, Submit):
                self._deliver(self.router.submit(channel.slot, msg))
            elif isinstance(msg, Cancel):
                self._deliver(self.router.cancel(channel.slot, msg))
            else:
                logger.warning("a worker sent %s, which only the engine sends", type(msg).__name__,
                               extra={"slot": channel.slot})

    def _discard_stale_requests(self) -> None:
        """Before READY: a previous engine's unread SUBMIT/CANCEL frames were
        already failed on the worker side (the generation changed), so running
        them now would only waste the batch."""
        self._follow_workers(check_owners=True)
        for channel in self.channels.by_slot.values():
            while channel.requests.get_many(1024):
                pass

    def _deliver(self, replies: list[Reply]) -> None:
        by_slot: dict[int, list[bytes]] = {}
        for slot, msg in replies:
            by_slot.setdefault(slot, []).append(encode(msg))
        for slot, frames in by_slot.items():
            channel = self.channels.by_slot.get(slot)
            if channel is not None:  # else the worker left meanwhile: nobody to tell
                channel.responses.send_many(frames)

    def _flush(self, now: float) -> bool:
        """Retry backlogs; a worker stuck full past the limits loses its
        requests (their ERRORs wait in its backlog). True if any backlog remains."""
        any_backlog = False
        for channel in list(self.channels.by_slot.values()):
            sender = channel.responses
            before = sender.backlog
            if before == 0:
                continue
            sender.flush()
            if sender.backlog == 0:
                self._stalled_since.pop(channel.slot, None)
                continue
            any_backlog = True
            if sender.backlog < before:
                self._stalled_since[channel.slot] = now  # progress: the worker reads
                continue
            since = self._stalled_since.setdefault(channel.slot, now)
            if now - since > WORKER_STALL_LIMIT_S or sender.backlog > MAX_BACKLOG_MESSAGES:
                self._fail_stalled_worker(channel, now - since)
        return any_backlog

    def _fail_stalled_worker(self, channel: Channel, stalled_s: float) -> None:
        dropped = self.router.drop_worker(channel.slot, "worker_stalled")
        channel.responses.clear()
        self._stalled_since[channel.slot] = time.monotonic()
        message = f"the worker did not read its responses for {stalled_s:.1f} s; request cancelled"
        channel.responses.send_many([encode(Error(rid, message)) for rid in dropped])
        logger.error("worker stalled; its requests were cancelled",
                     extra={"slot": channel.slot, "worker_pid": channel.pid, "requests_cancelled": len(dropped)})

    # ---- control block ----------------------------------------------------------
    def _publish(self, now: float) -> None:
        self.control.publish_load(self.core.num_waiting, self.core.num_running)
        if self.metrics is not None:
            self.metrics.set_load(self.core.num_running, self.core.num_waiting)
            self.metrics.set_kv_pages(self.core.kv_pages_used, self.core.kv_pages_free)
            stats = self.core.stats
            queries, hits = self._published_prefix_cache
            self.metrics.observe_prefix_cache(stats.prefix_cache_queries - queries, stats.prefix_cache_hits - hits)
            self._published_prefix_cache = (stats.prefix_cache_queries, stats.prefix_cache_hits)
        if now >= self._next_memory_update:
            self._next_memory_update = now + DEVICE_MEMORY_INTERVAL_S
            used, total = device_memory(self.core.device)
            self.control.publish_device_memory(used, total)
            if self.metrics is not None:
                self.metrics.device_memory.set(used)
                self.metrics.observe_tables(self.router.table_sizes())
        self._publish_circuit()
        if self.control.config_version != self._config_version:
            self._reload_config()

    def _publish_circuit(self) -> None:
        """The breaker's state, when it changed (the probe time it publishes
        with OPEN is absolute, so nothing needs refreshing in between)."""
        circuit = self.router.circuit
        seen = (circuit.state, circuit.times_opened)
        if seen == self._published_circuit:
            return
        self.control.publish_circuit(circuit.state, circuit.retry_after())
        if self.metrics is not None:
            self.metrics.circuit_state.set(int(circuit.state))
            if self._published_circuit is not None:
                self.metrics.circuit_opened.inc(circuit.times_opened - self._published_circuit[1])
        self._published_circuit = seen

    def _reload_config(self) -> None:
        """Apply the runtime-tunable settings (PATCH /admin/config writes the
        whole ServerConfig as JSON into the control block)."""
        self._config_version, blob = self.control.read_config()
        try:
            config = ServerConfig.from_json(blob.decode())
        except (ValueError, TypeError) as error:
            logger.error("ignoring an unreadable configuration update: %s", error)
            return
        self.config = config
        self.router.max_queue = config.max_queue
        self.router.request_timeout_s = config.request_timeout_s
        logging.getLogger().setLevel(config.log_level.upper())
        logger.info("configuration updated", extra={"config_version": self._config_version})

    # ---- drain ------------------------------------------------------------------
    def _begin_drain(self, now: float) -> None:
        self._drain_deadline = now + self.config.drain_timeout_s
        self.router.draining = True
        self.control.set_state(EngineState.DRAINING)
        logger.info("draining", extra={"running": self.core.num_running, "waiting": self.core.num_waiting,
                                       "drain_timeout_s": self.config.drain_timeout_s})

    def _drained(self, now: float) -> bool:
        """True when the engine may exit: nothing live and every answer
        delivered, or the drain timeout passed (what is left gets ERROR)."""
        if not self.router.live and not any(c.responses.backlog for c in self.channels.by_slot.values()):
            return True
        if now < self._drain_deadline:
            return False
        self._deliver(self.router.fail_all("the server shut down before the request finished"))
        give_up = time.monotonic() + 1.0  # a last chance for readers to take the ERRORs
        while not self.channels.flush() and time.monotonic() < give_up:
            time.sleep(0.01)
        return True


def device_memory(device) -> tuple[int, int]:
    """(used, total) bytes: the CUDA allocator's on a GPU, the process RSS on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return rss_pages * page, os.sysconf("SC_PHYS_PAGES") * page


class _Heartbeat(threading.Thread):
    def __init__(self, control) -> None:
        super().__init__(name="engine-heartbeat", daemon=True)
        self.control = control
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            self.control.beat()


def prepare_core(config: ServerConfig, control):
    """Load the model (state LOADING) and warm it up (WARMING) -> EngineCore."""
    import torch

    from dfastllm.engine.build import build_engine_core

    torch.set_num_threads(config.resolved_engine_threads())
    logger.info("engine threads", extra={"torch_threads": torch.get_num_threads()})
    # A bar only where someone watches it: text logs on a terminal.
    core = build_engine_core(config, progress_bar=config.log_format == "text" and sys.stderr.isatty())
    if config.warmup:
        control.set_state(EngineState.WARMING)
        logger.info("warming up", extra={"kv_cache": config.kv_cache, "block_length": config.default_block_length})
        started = time.perf_counter()
        core.warmup(block_length=config.default_block_length)
        logger.info("warm-up done", extra={"seconds": round(time.perf_counter() - started, 3),
                                           "kv_cache": config.kv_cache, "block_length": config.default_block_length})
    failures = int(os.environ.get(FAULT_INJECT_ENV) or 0)
    if failures:
        inject_step_errors(core, failures)
        logger.warning("fault injection: the next %d denoising steps will fail (%s)", failures, FAULT_INJECT_ENV)
    return core


def inject_step_errors(core, failures: int) -> None:
    """Make the next `failures` forwards of `core`'s model raise, from the
    outside (the engine calls `forward_packed`, which runs no module hooks,
    so it is wrapped): the step they belong to fails its requests as an
    out-of-memory would. CPU tests only: a replayed CUDA graph calls no Python."""
    remaining = failures
    forward_packed = core.model.forward_packed

    def fail_then_forward(*args, **kwargs):
        nonlocal remaining
        if remaining > 0:
            remaining -= 1
            raise RuntimeError("injected fault")
        return forward_packed(*args, **kwargs)

    core.model.forward_packed = fail_then_forward


def is_permanent_failure(error: BaseException) -> bool:
    """Whether a failure to load (or warm up) can only repeat on a restart:
    a malformed or incomplete checkpoint, an impossible setting, a hub id
    that does not exist, a compiled module that cannot load. Transient I/O
    errors were retried by the loader already; those, out-of-memory and the
    rest get a restart."""
    from dfastllm import ExtensionError
    from dfastllm.models.loader import CheckpointDownloadError, is_transient

    if isinstance(error, CheckpointDownloadError):
        return error.__cause__ is not None and not is_transient(error.__cause__)
    return isinstance(error, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError,
                              NotADirectoryError, IsADirectoryError, ExtensionError))


def main() -> int:
    config = ServerConfig.from_process_env()
    from dfastllm import tracing
    from dfastllm.log import configure_logging

    configure_logging("engine", level=config.log_level, fmt=config.log_format)
    tracing.setup_tracing(config.tracing, service_name="dfastllm-engine", endpoint=config.otlp_endpoint)
    layout = IpcLayout.attach()
    control = layout.control
    generation = control.engine_started()
    heartbeat = _Heartbeat(control)
    heartbeat.start()
    # Only now, with the environment from the supervisor in place, may
    # prometheus_client be imported (it picks multiprocess mode at import).
    from dfastllm.engine.metrics import EngineMetrics

    engine: EngineProcess | None = None

    def on_sigterm(signum, frame) -> None:
        if engine is None:  # still loading: nothing to drain
            raise SystemExit(0)
        engine.stop_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    model = config.model or "the embedded tiny model"
    try:
        logger.info("loading model", extra={"model": model, "generation": generation})
        try:
            core = prepare_core(config, control)
        except Exception as error:
            message = f"cannot serve {model}: {one_line(error)}"
            control.set_state(EngineState.FAILED)
            if is_permanent_failure(error):
                logger.error("%s (not retrying: a restart cannot fix this)", message)
                report_cannot_start(message)
                return EXIT_CANNOT_START
            # One line; the traceback only for whoever asked for debug logs.
            logger.error("%s", message, exc_info=logger.isEnabledFor(logging.DEBUG))
            return 1
        engine = EngineProcess(config, layout, core, EngineMetrics())
        code = engine.serve()
    except Exception:
        logger.exception("the engine failed")
        control.set_state(EngineState.FAILED)
        return 1
    finally:
        heartbeat.stopped.set()
        tracing.shutdown_tracing()
        if supervisor_gone():
            removed = remove_run_segments(layout.base_name)
            logger.info("the supervisor is gone; removed the run's shared-memory segments",
                        extra={"segments": removed})
    control.set_state(EngineState.STOPPED)
    logger.info("engine stopped", extra={"exit_code": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
