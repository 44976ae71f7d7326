"""The locustfiles, run headless as `locust` processes (never imported here: locust's gevent patching
and this process's boto3 do not mix) against a real `thaw up` serving the tiny model; and a bench's servers
when the bench is stopped."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import poll
from thaw.launch import ServerProcess, base_env, free_port

ROOT = Path(__file__).resolve().parent.parent
LOCUST = str(Path(sys.executable).parent / "locust")


@pytest.fixture(scope="module")
def plane(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("load")
    port, sink_port = free_port(), free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(work / "state"),
                         "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}},
            "models": [{"name": "tiny", "source": str(tiny_model), "engine": {"max_model_len": 512},
                        "scaling": {"window": "6s"}}],
            "triggers": [{"name": "locust-sink", "filter": {"attributes": {"type": "dev.thaw.inference.response"}},
                          "subscriber": {"uri": f"http://127.0.0.1:{sink_port}/"}}]}
    (work / "thaw.yaml").write_text(yaml.safe_dump(spec))
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(work / "thaw.yaml")], work / "up.log")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_http(url + "/healthz", 60)
        poll(lambda: server.wait_http(url + "/thaw/v1/status", 5).json()["standby"], 120, 0.5, "standby")
        yield {"url": url, "sink_port": sink_port, "work": work}
    finally:
        server.stop(60)


def run_locust(plane, locustfile: str, users: int, seconds: int, **env) -> dict[tuple[str, str], dict]:
    """Locust's stats by (type, name); the run's own report (metrics.py) under ("report", "")."""
    prefix = plane["work"] / Path(locustfile).stem
    environment = base_env(THAW_MODELS="tiny", THAW_SINK_PORT=str(plane["sink_port"]),
                           THAW_REPORT=f"{prefix}_report.json", **env)
    out = subprocess.run([LOCUST, "-f", str(ROOT / "loadtests" / locustfile), "--headless", "-u", str(users),
                          "-r", str(users), "-t", f"{seconds}s", "--host", plane["url"], "--csv", str(prefix),
                          "--only-summary", "--stop-timeout", "30"],
                         capture_output=True, text=True, env=environment, timeout=seconds + 120)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    report = Path(f"{prefix}_report.json")
    if report.exists():
        stats[("report", "")] = json.loads(report.read_text())
    return stats


def test_openai_streaming_users_record_ttft_itl_and_tokens_per_s(plane):
    stats = run_locust(plane, "openai_stream.py", users=4, seconds=20, THAW_MAX_TOKENS="16", THAW_RATE="2",
                       THAW_GOODPUT="ttft:60000 tpot:60000")
    requests_made = int(stats[("POST", "chat tiny")]["Request Count"])
    assert requests_made > 0
    assert int(stats[("POST", "chat tiny")]["Failure Count"]) == 0
    for kind in ("TTFT", "TPOT", "E2EL", "tokens/s"):
        assert int(stats[(kind, "tiny")]["Request Count"]) == requests_made
    # one gap per pair of content chunks: 15 for 16 tokens, fewer where the replica merged the deltas of a
    # stream that fell behind into one chunk (as vLLM's server does)
    assert 0 < int(stats[("ITL", "tiny")]["Request Count"]) <= 15 * requests_made
    assert float(stats[("tokens/s", "tiny")]["Average Response Time"]) > 1  # a rate, in tokens per second
    report = stats[("report", "")]
    # the report also counts requests that ended after locust wrote its statistics (during --stop-timeout)
    completed = report["completed"]
    assert completed >= requests_made and 0 < report["itl"]["count"] <= 15 * completed
    assert report["tpot"]["count"] == report["e2el"]["count"] == completed
    assert report["ttft"]["p50"] <= report["ttft"]["p90"] <= report["ttft"]["p99"] <= report["e2el"]["p99"]
    assert report["goodput"]["good"] == completed  # SLOs no request misses


def test_cold_start_burst_waits_for_zero_and_records_first_response_and_queue(plane):
    stats = run_locust(plane, "coldstart.py", users=1, seconds=40, THAW_BURST="4", THAW_AT_ZERO_TIMEOUT="60")
    first = stats[("first response", "tiny")]
    assert int(first["Request Count"]) >= 4  # a whole burst at least (the run may end mid-burst)
    assert int(stats[("POST", "chat tiny")]["Failure Count"]) == 0
    # at zero the activator held every request of the burst while the replica started
    assert float(stats[("queued", "tiny")]["Min Response Time"]) > 100
    # and the gateway marked each as cold: cold TTFT is the first response of every burst request
    assert int(stats[("cold TTFT", "tiny")]["Request Count"]) == int(first["Request Count"])
    assert stats[("report", "")]["cold_ttft"]["count"] >= int(first["Request Count"])


def test_event_driven_round_trip_through_the_broker(plane):
    stats = run_locust(plane, "events.py", users=2, seconds=20)
    assert int(stats[("POST", "broker ingress")]["Failure Count"]) == 0
    event = stats[("event", "tiny")]
    assert int(event["Request Count"]) > 0 and int(event["Failure Count"]) == 0


# Run as `python -c SERVES PIDFILE`: a bench-like process that holds a server until it is told to stop.
SERVES = """
import sys, time
from pathlib import Path
from thaw.launch import ServerProcess, stop_servers_on_sigterm
stop_servers_on_sigterm()
server = ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"], Path(sys.argv[1]).with_suffix(".log"))
try:
    Path(sys.argv[1]).write_text(str(server.pid))
    time.sleep(600)
finally:
    server.stop(5)
"""


def test_a_bench_stopped_by_sigterm_stops_its_servers(tmp_path):
    """`timeout` ends a bench part with SIGTERM: the servers it started must not outlive it (on a GPU they keep
    their memory and the next part's server cannot start)."""
    pidfile = tmp_path / "server.pid"
    bench = subprocess.Popen([sys.executable, "-c", SERVES, str(pidfile)])
    server = psutil.Process(int(poll(lambda: pidfile.exists() and pidfile.read_text(), 60, what="the server")))
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(60) == 128 + signal.SIGTERM
    poll(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 30, what="the server gone")
