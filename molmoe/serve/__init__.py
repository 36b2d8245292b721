"""`molmoe serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

schemas.py  request/response bodies (pydantic) and OpenAI's error shape
worker.py   the engine thread, the preprocessing pool, admission
metrics.py  Prometheus text format, by hand
app.py      `create_app(...)`: the FastAPI routes
server.py   uvicorn: `serve(...)`, `BackgroundServer` (tests, benchmarks)
docs/serve.md describes the endpoints, limits, status codes and metrics.
"""
from molmoe.serve.options import ServeOptions

__all__ = ["ServeOptions", "create_app"]


def create_app(*args, **kwargs):
    from molmoe.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
