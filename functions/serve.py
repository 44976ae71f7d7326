"""Run a function under gunicorn, in this process as the master (`thaw function serve`)."""

from __future__ import annotations

from thaw.wsgi import GunicornApp

from .app import FunctionConfig, create_app
from .gunicorn_conf import options


def serve(config: FunctionConfig, host: str = "127.0.0.1", port: int = 8000, threads: int = 64) -> None:
    GunicornApp(lambda: create_app(config), options(host, port, threads)).run()
