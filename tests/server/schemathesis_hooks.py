"""The rules of the API that its OpenAPI document cannot state, told to
schemathesis (loaded by the repository's `schemathesis.toml`).

JSON Schema bounds each field on its own; it cannot count a prompt's tokens
or compare two fields. A request the document allows can still break one of
these rules, and the server then refuses it with 400 and names the rule:
- `context_length_exceeded`: prompt tokens + max_tokens over the model's
  context (the HTTP contract's validation table);
- `steps` or `block_length` over max_tokens (the request's, else the
  server's default);
- Dream's `alg` against `threshold` (threshold decoding ranks by the
  token's probability) and `alg_temp` against `alg` origin (no ranking).
A 400 for a request the document allows is a failure unless it is one of
these; every other failure stands.
"""

from __future__ import annotations

import json

import schemathesis

SCHEMA_VALID_REJECTED = "ST202"
RULES_ACROSS_FIELDS = {("context_length_exceeded", "prompt"), ("context_length_exceeded", "max_tokens"),
                       ("invalid_value", "steps"), ("invalid_value", "block_length"),
                       ("invalid_value", "alg"), ("invalid_value", "alg_temp")}


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """False (drop the failure) only for a refusal under one of the rules above."""
    if failure.code != SCHEMA_VALID_REJECTED or response.status_code != 400:
        return True
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return True
    return (error.get("code"), error.get("param")) not in RULES_ACROSS_FIELDS
