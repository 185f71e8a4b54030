"""Request identity and API version, on every response (errors included)."""

from __future__ import annotations

import re
import time
import uuid

from dfastllm import API_VERSIONS
from dfastllm.log import request_id_var
from server.errors import InvalidRequest

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CURRENT_API_VERSION = API_VERSIONS[-1]


def valid_request_id(text: str) -> bool:
    return REQUEST_ID_PATTERN.fullmatch(text) is not None


class RequestIdentity:
    """`X-Request-ID` (the client's if valid, else a fresh one) and
    `X-API-Version`; the request id also goes into every log line."""

    async def process_request(self, req, resp) -> None:
        req.context.started = time.perf_counter()
        given = req.get_header("X-Request-ID")
        req.context.request_id = given if given is not None and valid_request_id(given) else uuid.uuid4().hex
        request_id_var.set(req.context.request_id)
        if given is not None and req.context.request_id != given:
            raise InvalidRequest("X-Request-ID must be 1 to 128 characters of [A-Za-z0-9._:-].",
                                 param="X-Request-ID")
        version = req.get_header("X-API-Version")
        if version is not None and version not in API_VERSIONS:
            raise InvalidRequest(f"Unsupported X-API-Version; supported versions: {', '.join(API_VERSIONS)}.",
                                 param="X-API-Version", code="unsupported_api_version")

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        resp.set_header("X-Request-ID", req.context.request_id)
        resp.set_header("X-API-Version", CURRENT_API_VERSION)
