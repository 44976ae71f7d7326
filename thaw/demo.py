"""The main job, for now: the demo model served by the function from a cold start, one question answered."""

from __future__ import annotations

import time
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

from thaw.launch import ServerProcess, free_port, function_command

DEMO_ENGINE_ARGS = {"dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": True}


def run_demo(model_dir: Path, question: str, port: int, console: Console) -> int:
    if not (model_dir / "config.json").exists():
        console.print(f"[red]no model at {model_dir}[/red]: build it with `thaw model demo {model_dir}`")
        return 1
    port = port or free_port()
    log = Path(".thaw/logs/demo-function.log")
    console.print(f"starting the function for {model_dir} on 127.0.0.1:{port} (log: {log})")
    server = ServerProcess(function_command(model_dir.resolve(), "smollm2", port, DEMO_ENGINE_ARGS), log)
    try:
        with console.status("cold start: process, imports, weights, engine init..."):
            ready = server.wait_http(f"http://127.0.0.1:{port}/readyz", 300).json()
        ready_at = time.time() - server.launched_at
        body = {"model": "smollm2", "messages": [{"role": "user", "content": question}],
                "max_tokens": 64, "temperature": 0}
        answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).json()
        answered_at = time.time() - server.launched_at
        console.print(f"[bold]Q:[/bold] {question}")
        console.print(f"[bold]A:[/bold] {answer['choices'][0]['message']['content']}")
        table = Table(title="start-up (seconds)")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        for phase, seconds in ready["phases"].items():
            table.add_row(phase, f"{seconds:.2f}")
        table.add_row("ready after launch", f"{ready_at:.2f}")
        table.add_row("answered after launch", f"{answered_at:.2f}")
        console.print(table)
        return 0
    finally:
        server.stop()
