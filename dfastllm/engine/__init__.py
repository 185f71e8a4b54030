"""The engine: scheduler and denoising loop (`EngineCore`), and the process
around it.

Importing this package stays torch-free: the HTTP workers import
`dfastllm.engine.client` through it. The torch side loads on first use of
`EngineCore`, `EngineStats` or `RequestOutput`.
"""

_LAZY = {
    "EngineCore": "dfastllm.engine.core",
    "EngineStats": "dfastllm.engine.core",
    "KV_CACHE_MODES": "dfastllm.engine.core",
    "RequestOutput": "dfastllm.engine.request",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dfastllm.engine' has no attribute {name!r}")
