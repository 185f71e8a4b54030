"""The OpenAI-compatible HTTP front end: a Falcon ASGI app served by Granian.

`server.app.create_app(config, engine_client)` builds it; `server.asgi:app`
is what Granian imports; `server.launch.run_granian(config)` starts Granian.
Torch-free: a worker imports the tokenizer, never the model.
"""
