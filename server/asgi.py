"""The module Granian imports in every worker: `server.asgi:app`."""

from server.app import create_app_from_env

app = create_app_from_env()
