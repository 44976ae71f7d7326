"""Run a function under gunicorn, in this process as the master (`thaw function serve`, or a replica forked
from the standby)."""

from __future__ import annotations

import logging
import os

from thaw.wsgi import GunicornApp

from .app import FunctionConfig
from .gunicorn_conf import options
from .pool import ReplicaApp


def serve(config: FunctionConfig, host: str = "127.0.0.1", port: int = 8000, threads: int = 64) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The cores the serving plane placed this replica on (knative/embedded/control/node.py): the whole process
    # tree runs there (gunicorn's worker and vLLM's engine inherit it; vLLM's CPU engine binds its threads there).
    cores = os.environ.get("THAW_CPU_CORES")
    if cores:
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
    GunicornApp(lambda: ReplicaApp(config), options(host, port, threads)).run()
