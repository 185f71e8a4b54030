"""The gates a request passes after auth, before any work is done for it.

For generation requests (POST /v1/completions, /v1/chat/completions):
- the engine takes requests: not draining or starting (503
  `engine_unavailable`), circuit breaker not open (503 `engine_unavailable`
  with Retry-After until the engine's half-open probe);
- load shedding (503 `overloaded`, Retry-After): the engine's queue (from
  the control block) is at `max_queue`, or the estimated wait exceeds
  `max_queue_wait_s`. The estimate is

      queue depth x recent service time / max_batch_size

  where the service time is a moving average of the durations of recent
  successful generations, shared by all workers (`RateLimitTable`).

Then, for every /v1 request, the rate limit (429 `rate_limit_exceeded`,
Retry-After): `rate_limit_per_minute` requests per minute per API key, or
per client address when the request has no key, counted in shared memory
by all workers together. A request refused here never reaches the engine,
so it does not consume its request id, and a request shed with 503 does
not count against its client's rate.

Every limit is read from `state.config` per request, so PATCH /admin/config
changes them at once.
"""

from __future__ import annotations

import ipaddress
import logging

from dfastllm.ipc.control import CircuitState, EngineState
from dfastllm.ipc.rate_limit import RateLimitTable, retry_after_header
from server.errors import RateLimited, Unavailable
from server.middleware.http_metrics import GENERATION_PATHS

log = logging.getLogger(__name__)

# Retry-After of an overload whose wait cannot be estimated yet.
OVERLOAD_RETRY_S = 1.0
MAX_RETRY_AFTER_S = 600.0


class TrustedProxies:
    """Addresses (or networks, "10.0.0.0/8") whose X-Forwarded-For is believed."""

    def __init__(self, entries: list[str]):
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in entries]

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client_address(self, req) -> str:
        """The client's address: the peer's, unless the peer is a trusted
        proxy; then the last X-Forwarded-For hop that is not one (the first
        address a trusted proxy saw, which the client cannot forge)."""
        peer = req.remote_addr or "unknown"
        if not self.networks or peer not in self:
            return peer
        hops = [hop.strip() for hop in (req.get_header("X-Forwarded-For") or "").split(",") if hop.strip()]
        for hop in reversed(hops):
            if hop not in self:
                return hop if _is_address(hop) else peer
        return hops[0] if hops else peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def circuit_open(snap) -> bool:
    """The engine's circuit breaker refuses requests. Once its probe time
    has come (and while half-open) requests go through again: the engine
    admits one as the probe whose outcome closes or reopens the circuit."""
    return snap.circuit_state == CircuitState.OPEN and snap.circuit_retry_after_s > 0


class Admission:
    def __init__(self, state, rate_limits: RateLimitTable, proxies: TrustedProxies):
        self.state = state
        self.rate_limits = rate_limits
        self.proxies = proxies

    async def process_request(self, req, resp) -> None:
        if req.method == "OPTIONS" or not req.path.startswith("/v1/"):
            return
        if req.method == "POST" and req.path in GENERATION_PATHS:
            self.check_engine()
        limit = self.state.config.rate_limit_per_minute
        if limit:
            key_id = getattr(req.context, "key_id", None)
            client = f"key:{key_id}" if key_id else f"addr:{self.proxies.client_address(req)}"
            retry = self.rate_limits.acquire(client, limit)
            if retry is not None:
                raise RateLimited(f"Rate limit of {limit} requests per minute exceeded; retry later.",
                                  headers={"Retry-After": retry_after_header(retry)})

    def check_engine(self) -> None:
        snap = self.state.engine.state()
        if snap.state != EngineState.READY:
            what = "shutting down" if snap.state == EngineState.DRAINING else snap.state.name.lower()
            raise Unavailable(f"The engine takes no new requests now ({what}); retry shortly.")
        if circuit_open(snap):
            raise Unavailable("The engine failed repeatedly and is paused (circuit breaker open); retry later.",
                              headers={"Retry-After": retry_after_header(snap.circuit_retry_after_s)})
        config = self.state.config
        service_time = self.rate_limits.service_time()
        wait = snap.queue_depth * service_time / config.max_batch_size if service_time else None
        if snap.queue_depth >= config.max_queue or (wait is not None and wait > config.max_queue_wait_s):
            retry = min(wait if wait else OVERLOAD_RETRY_S, MAX_RETRY_AFTER_S)
            log.debug("shedding a request", extra={"queue_depth": snap.queue_depth, "estimated_wait_s": wait})
            raise Unavailable("The server is overloaded; retry later.", code="overloaded",
                              headers={"Retry-After": retry_after_header(retry)})

    def record_service_time(self, seconds: float) -> None:
        """A successful generation's duration, for the wait estimate."""
        self.rate_limits.record_service_time(seconds)
