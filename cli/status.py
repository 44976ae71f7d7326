"""`thaw status`: the serving plane's state, as a table or JSON."""

from __future__ import annotations

import json

import requests
from rich.console import Console
from rich.table import Table


def _sleeping(asleep: int, hibernated: int) -> str:
    """Sleeping replicas, those hibernated (weights dropped) said apart from the parked."""
    return f"{asleep} ({hibernated} hibernated)" if hibernated else str(asleep)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def show_status(url: str, token: str | None, as_json: bool, console: Console) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(url.rstrip("/") + "/thaw/v1/status", headers=headers, timeout=5)
    except requests.RequestException as exc:
        console.print(f"[red]no thaw gateway at {url}[/red] ({type(exc).__name__}); is `thaw up` running?")
        return 1
    if r.status_code != 200:
        console.print(f"[red]{r.status_code}[/red] {r.json().get('error', {}).get('message', r.text)}")
        return 1
    data = r.json()
    if as_json:
        console.print_json(json.dumps(data))
        return 0
    platform = data.get("platform") or {}
    gpu = data.get("gpu")
    card = f", GPU {_gib(gpu['total'] - gpu['free'])} of {_gib(gpu['total'])} used" if gpu else ""
    table = Table(title=f"thaw at {url}  (standby: {'ready' if data['standby'] else 'off'}; "
                        f"{platform.get('vllm', '?')} on {platform.get('device', '?')}{card})")
    for col in ("model", "revision", "traffic", "want", "pending", "start", "ready", "drain", "parked", "panic",
                "queue", "busy", "GPU held", "host copies"):
        table.add_column(col, no_wrap=True)
    for model in data["models"]:
        for rev in model["revisions"]:
            traffic = f"{rev['percent']}%" + (f" @{rev['tag']}" if rev["tag"] else "")
            reps = rev["replicas"]
            gpu_held = [p["gpu_bytes"] for p in rev["pods"] if p.get("gpu_bytes") is not None]
            table.add_row(model["name"], rev["name"], traffic, str(rev["desired"]), str(reps.get("pending", 0)),
                          str(reps["starting"]),
                          str(reps["ready"]) + (f" ({reps['unready']} unready)" if reps.get("unready") else ""),
                          str(reps["draining"]) + (f" ({reps['terminating']} terminating)" if reps.get("terminating") else ""),
                          _sleeping(reps.get("parked", 0), rev.get("hibernated", 0)),
                          "yes" if rev["panic"] else "no", str(rev["queue"]), str(rev["in_flight"]),
                          _gib(sum(gpu_held)) if gpu_held else "-",
                          _gib(sum(p.get("host_copy_bytes", 0) for p in rev["pods"])))
    console.print(table)
    host = data.get("host")
    if host and host.get("host_copies"):
        console.print(f"host RAM: {_gib(host['available'])} free of {_gib(host['total'])} (floor {_gib(host['floor'])}); "
                      f"host copies of weights {_gib(host['host_copies'])}", highlight=False)
    for model in data["models"]:
        for rev in model["revisions"]:
            if rev.get("pending"):
                console.print(f"[yellow]{rev['name']}[/yellow]: a wanted replica is Pending: {rev['pending']}")
            if rev.get("failure"):
                console.print(f"[red]{rev['name']}[/red]: {rev['failure']}")
    for shape in data.get("engine_pool") or []:
        console.print(f"engine pool, {shape['launchedAs']}'s shape: {len(shape['waiting'])} waiting"
                      + (", one starting" if shape["starting"] else "") + f" (adopted so far: {shape['adopted']})",
                      highlight=False)
    for problem in data.get("spec_refused") or []:
        console.print(f"[red]the newest spec edit was refused[/red] (the running configuration stays): {problem}")
    for model in data["models"]:
        console.print(f"{model['name']}: weights at {model['weights']}", highlight=False)
        for rev in model["revisions"]:
            if rev.get("last_start_timeline"):
                console.print(f"{rev['name']}: last start or wake, seconds since asked: "
                              + ", ".join(f"{event} {at:.2f}" for event, at in rev["last_start_timeline"].items()),
                              highlight=False)
    return 0
