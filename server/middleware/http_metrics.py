"""Counts every HTTP response by route and status, and the generation
requests refused before they reached the engine."""

from __future__ import annotations

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# Clients may send any token as the method: others count as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetricsMiddleware:
    def __init__(self, metrics):
        self.metrics = metrics

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        # The route template, not the path, keeps the label set bounded.
        route = req.uri_template or "unmatched"
        method = req.method if req.method in KNOWN_METHODS else "other"
        self.metrics.http_requests.labels(method, route, str(resp.status_code)).inc()
        code = getattr(req.context, "error_code", None)
        if code is not None and req.path in GENERATION_PATHS and not getattr(req.context, "admitted", False):
            self.metrics.rejected.labels(code).inc()
