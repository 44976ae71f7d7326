"""Run a function under gunicorn, in this process as the master (`thaw function serve`)."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from .app import FunctionConfig, create_app
from .gunicorn_conf import options


class FunctionServer(BaseApplication):
    """gunicorn's documented custom-application hook: settings from code, the app from a factory."""

    def __init__(self, config: FunctionConfig, host: str, port: int, threads: int = 64):
        self.function_config = config
        self.settings = options(host, port, threads)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings.items():
            self.cfg.set(key, value)

    def load(self):
        # Called in the worker after the fork: the engine belongs to the worker process.
        return create_app(self.function_config)


def serve(config: FunctionConfig, host: str = "127.0.0.1", port: int = 8000, threads: int = 64) -> None:
    FunctionServer(config, host, port, threads).run()
