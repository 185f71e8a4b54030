"""Falcon middleware (request identity, metrics, body limit, CORS, auth,
engine lifespan) and the ASGI-level channel wrapper. The order of the chain
is set in `server.app.create_app`."""
