"""API keys: `Authorization: Bearer <key>` when keys are configured.

Keys are compared in constant time against every configured key and never
logged; a request is known by its key id (a hash prefix) instead.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from server.errors import Forbidden, Unauthorized

PUBLIC_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/version", "/openapi.json"})
ADMIN_PREFIX = "/admin"


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


def _matches(key: bytes, keys: list[bytes]) -> bool:
    matched = False
    for candidate in keys:  # no early exit: the time does not depend on which key matched
        matched |= hmac.compare_digest(key, candidate)
    return matched


class ApiKeyAuth:
    def __init__(self, api_keys: list[str], admin_keys: list[str], *, metrics_require_key: bool,
                 routed: Callable[[str, str], bool]):
        """`routed(path, method)`: whether a route serves it; if not, Falcon's
        404 or 405 comes before any key check."""
        self.api_keys = [k.encode() for k in api_keys]
        self.admin_keys = [k.encode() for k in admin_keys]
        self.public = PUBLIC_PATHS if metrics_require_key else PUBLIC_PATHS | {"/metrics"}
        self.routed = routed

    async def process_request(self, req, resp) -> None:
        req.context.key_id = None
        if req.method == "OPTIONS" or req.path in self.public:
            return
        admin = req.path == ADMIN_PREFIX or req.path.startswith(ADMIN_PREFIX + "/")
        # Nothing to check (no keys): no route lookup on the request path either.
        if not self.api_keys and not admin or not self.routed(req.path, req.method):
            return
        if admin and not self.admin_keys:
            raise Forbidden("The admin API is off: no admin keys are configured.")
        key = _bearer(req.get_header("Authorization"))
        if key is None or not _matches(key, self.api_keys + self.admin_keys):
            raise Unauthorized("Invalid or missing API key; send it as 'Authorization: Bearer <key>'.")
        if admin and not _matches(key, self.admin_keys):
            raise Forbidden("This key may not use the admin API.")
        req.context.key_id = key_id(key)


def _bearer(header: str | None) -> bytes | None:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()
