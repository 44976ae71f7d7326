"""The main job: `thaw up` on examples/thaw.yaml, the demo model answering from zero, the scale shown."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import openai
import requests
from rich.console import Console
from rich.table import Table

from thaw.launch import ServerProcess, wait_until
from thaw.spec import load_spec
from thaw.cli.status import show_status


def run_demo(spec_path: Path, question: str, console: Console) -> int:
    spec = load_spec(spec_path)
    model = spec.models[0]
    if not (Path(model.source) / "config.json").exists():
        console.print(f"[red]no model at {model.source}[/red]: build it with `thaw model demo {model.source}`")
        return 1
    url = spec.platform.gateway.local_url
    log = Path(spec.platform.stateDir) / "logs" / "demo-up.log"
    console.rule(f"thaw up -f {spec_path}  (log: {log})")
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(spec_path)], log)
    try:
        with console.status("starting the gateway, the autoscaler and the standby (imports torch and vLLM once)"):
            wait_until(lambda: requests.get(url + "/thaw/v1/status", timeout=2).json()["standby"], 300,
                       "standby ready", server)
        console.print(f"platform up after {time.time() - server.launched_at:.1f}s; {model.name} is at zero:")
        show_status(url, None, False, console)

        console.rule(f"a request to {model.served_name}, which has no replica")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        sent = time.time()
        first = None
        answer = []
        with console.status("scaling from zero: the activator holds the request, the KPA asks for 1 replica..."):
            for chunk in client.chat.completions.create(
                    model=model.served_name, messages=[{"role": "user", "content": question}], max_tokens=64,
                    temperature=0, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.time() - sent
                    answer.append(chunk.choices[0].delta.content)
        total = time.time() - sent
        console.print(f"[bold]Q:[/bold] {question}\n[bold]A:[/bold] {''.join(answer)}")
        rev = requests.get(url + "/thaw/v1/status", timeout=5).json()["models"][0]["revisions"][0]
        table = Table(title="from zero to the answer (seconds)")
        table.add_column("step")
        table.add_column("seconds", justify="right")
        for phase, seconds in rev["last_start_phases"].items():
            table.add_row(f"replica {phase}", f"{seconds:.2f}")
        table.add_row("first token after the request", f"{first:.2f}")
        table.add_row("whole answer after the request", f"{total:.2f}")
        console.print(table)
        console.print(f"{model.name} now runs {rev['replicas']['ready']} replica(s):")
        show_status(url, None, False, console)
        return 0
    finally:
        with console.status("stopping thaw up"):
            server.stop(60)
