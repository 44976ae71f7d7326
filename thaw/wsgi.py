"""Run a WSGI app factory under gunicorn, in this process as the master (gunicorn's custom-app hook)."""

from __future__ import annotations

from typing import Callable

from gunicorn.app.base import BaseApplication


class GunicornApp(BaseApplication):
    def __init__(self, load: Callable, settings: dict):
        self._load = load
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings.items():
            self.cfg.set(key, value)

    def load(self):
        # Called in the worker after the fork: what the app holds belongs to the worker process.
        return self._load()
