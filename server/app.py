"""`create_app(config, engine_client)`: the whole HTTP front end of one worker.

The chain, outermost first: the ASGI channel wrapper (body cap, disconnect
watch), then Falcon's middleware in order — request identity and API version
(so every response, errors included, carries them), the runtime settings
check (PATCH /admin/config on any worker), the request log (audit record at
the end of every request), HTTP metrics, the declared-length body limit,
CORS (only with configured origins), API keys, admission (engine state,
circuit breaker, load shedding, rate limit) and the engine attach/detach of
the worker's lifespan. Errors of every stage go to the one handler in
`server.errors`.
"""

from __future__ import annotations

import falcon
import falcon.asgi
import falcon.media
import orjson

from dfastllm.config import ServerConfig
from dfastllm.ipc.rate_limit import RateLimitTable
from dfastllm.ipc.rate_limit import segment_name as rate_limit_segment
from dfastllm.lifetime import die_with_parent
from server.errors import handle_error
from server.metrics import HttpMetrics
from server.middleware.admission import Admission, TrustedProxies
from server.middleware.audit import AuditSink, RequestLog
from server.middleware.auth import ApiKeyAuth
from server.middleware.body_limit import BodyLimit
from server.middleware.channel import ChannelApp
from server.middleware.http_metrics import HttpMetricsMiddleware
from server.middleware.identity import RequestIdentity
from server.middleware.lifespan import EngineLifespan
from server.middleware.runtime_config import ConfigRefresh, SharedConfig
from server.resources.admin import AdminConfig
from server.resources.chat import ChatCompletions
from server.resources.completions import Completions
from server.resources.health import Live, Ready
from server.resources.metrics import Metrics
from server.resources.models import Models
from server.resources.requests import Requests
from server.resources.tokenize import Detokenize, Tokenize
from server.resources.version import OpenApi, Version
from server.state import ServedModel, ServerState, checkpoint_dir


def create_app(config: ServerConfig, engine_client, *, tokenizer=None, model: ServedModel | None = None,
               rate_limits: RateLimitTable | None = None):
    """The ASGI app of one worker. `model` and `tokenizer` default to those
    of the checkpoint `config.model` names; `rate_limits` (the table all
    workers share) to one of this process alone."""
    if model is None:
        model = ServedModel.from_checkpoint(config, checkpoint_dir(config.model))
    if tokenizer is None:
        from dfastllm.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(model.path)
    state = ServerState(config=config, engine=engine_client, tokenizer=tokenizer, model=model,
                        metrics=HttpMetrics())

    rate_limits = rate_limits if rate_limits is not None else RateLimitTable.private()
    shared_config = SharedConfig(state, engine_client.control)
    proxies = TrustedProxies(config.trusted_proxies)
    admission = Admission(state, rate_limits, proxies)
    request_log = RequestLog(state, AuditSink.open(config.audit_log), proxies,
                             tables=lambda: table_sizes(engine_client, rate_limits),
                             on_generation_done=admission.record_service_time)

    middleware = [RequestIdentity(), ConfigRefresh(shared_config), request_log, HttpMetricsMiddleware(state.metrics),
                  BodyLimit(config.max_body_bytes)]
    if config.cors_origins:
        middleware.append(falcon.CORSMiddleware(allow_origins=config.cors_origins,
                                                expose_headers=["X-Request-ID", "X-API-Version"]))
    router = Router()
    middleware += [ApiKeyAuth(config.api_keys, config.admin_keys, metrics_require_key=config.metrics_require_key,
                              routed=router.serves),
                   admission, EngineLifespan(engine_client, warm_up=lambda: warm_up(tokenizer))]
    app = falcon.asgi.App(middleware=middleware, router=router)
    json_handler = falcon.media.JSONHandler(dumps=lambda obj: orjson.dumps(obj).decode(), loads=orjson.loads)
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = json_handler
    app.add_error_handler((Exception, falcon.HTTPError), handle_error)

    app.add_route("/v1/completions", Completions(state))
    app.add_route("/v1/chat/completions", ChatCompletions(state))
    models = Models(state)
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id}", models, suffix="model")
    app.add_route("/v1/requests/{request_id}", Requests(state))
    app.add_route("/v1/tokenize", Tokenize(state))
    app.add_route("/v1/detokenize", Detokenize(state))
    app.add_route("/health/live", Live())
    ready = Ready(state)
    app.add_route("/health/ready", ready)
    app.add_route("/health", ready)
    app.add_route("/metrics", Metrics(state))
    app.add_route("/version", Version())
    app.add_route("/openapi.json", OpenApi(state))
    app.add_route("/admin/config", AdminConfig(shared_config, request_log))
    return ChannelApp(app, config.max_body_bytes, config.body_timeout_s)


class Router(falcon.routing.CompiledRouter):
    """Falcon's router, which also says whether a route serves a method, so
    that a request Falcon answers 404 or 405 gets that answer before any key
    check (a fuzzer, or a client, learns it sent the wrong method)."""

    def __init__(self) -> None:
        super().__init__()
        self.methods: dict[str, frozenset[str]] = {}  # uri template -> methods its resource serves

    def add_route(self, uri_template: str, resource: object, **kwargs) -> None:
        self.methods[uri_template] = frozenset(self.map_http_methods(resource, **kwargs))
        super().add_route(uri_template, resource, **kwargs)

    def serves(self, path: str, method: str) -> bool:
        found = self.find(path)
        return found is not None and method in self.methods[found[3]]


def warm_up(tokenizer) -> None:
    """Compile the chat template (jinja, ~20 ms) and tokenize once, at worker
    start rather than in the first chat request."""
    if tokenizer.chat_template is not None:
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "warm-up"}]),
                         add_special_tokens=False)


def table_sizes(engine_client, rate_limits: RateLimitTable) -> dict[str, int]:
    """The tables that requests fill, for `dfastllm:internal_entries`: the
    engine client's open streams, pending cancel acknowledgements and
    background cancels (all emptied as requests end), and the clients the
    shared rate-limit table holds (fixed capacity; expired entries reused)."""
    return {**engine_client.table_sizes(), "rate_limit_clients": rate_limits.claimed_entries}


def create_app_from_env():
    """The app of a Granian worker: configuration and engine names from the
    environment the supervisor set."""
    from dfastllm import tracing
    from dfastllm.engine.client import EngineClient
    from dfastllm.log import configure_logging

    # Granian's master respawns its workers but, killed itself, leaves them
    # running: they would keep the port and answer probes for a dead server.
    die_with_parent()
    config = ServerConfig.from_process_env()
    configure_logging("worker", level=config.log_level, fmt=config.log_format)
    tracing.setup_tracing(config.tracing, service_name="dfastllm-worker", endpoint=config.otlp_endpoint)
    client = EngineClient.attach_from_env()
    return create_app(config, client, rate_limits=RateLimitTable.attach(rate_limit_segment(client.layout.base_name)))
