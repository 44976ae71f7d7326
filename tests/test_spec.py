"""The spec: validation errors name the file, the line, the path and the fix; the example is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from thaw.durations import parse_duration
from thaw.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "t.yaml")
    return info.value.problems


@pytest.mark.parametrize("text,expected", [
    ("models:\n  - name: Bad_Name\n    source: x\n", "t.yaml:2: models[0].name: 'Bad_Name' is not a DNS-1123 label"),
    ("models:\n  - name: a\n", "t.yaml:2: models[0].source: required field is missing"),
    ("models:\n  - name: a\n    source: x\n    colour: red\n", "t.yaml:4: models[0].colour: unknown field"),
    ("models:\n  - name: a\n    source: http://x/y\n", "t.yaml:3: models[0].source: 'http://x/y': a source is s3://"),
    ("models:\n  - name: a\n    source: x\n    scaling:\n      window: 2s\n",
     "t.yaml:5: models[0].scaling.window: must be between 6s and 3600s, got '2s'"),
    # Go's time.ParseDuration, as Knative parses the annotation: a unit is required
    ("models:\n  - name: a\n    source: x\n    scaling:\n      window: '60'\n",
     "t.yaml:5: models[0].scaling.window: '60' is not a Go duration"),
    ("models:\n  - name: a\n    source: x\n    scaling:\n      window: 60\n",
     "t.yaml:5: models[0].scaling.window: Input should be a valid string"),
    ("platform:\n  autoscaler:\n    tick-interval: 2 s\n",
     "t.yaml:3: platform.autoscaler.tick-interval: '2 s' is not a Go duration"),
    ("platform:\n  gateway:\n    idleTimeout: 1h2m3\n",
     "t.yaml:3: platform.gateway.idleTimeout: '1h2m3' is not a Go duration"),
    ("platform:\n  gateway:\n    maxBodySize: lots\n",
     "t.yaml:3: platform.gateway.maxBodySize: 'lots' is not a Kubernetes quantity"),
    ("models:\n  - name: a\n    source: x\n    scaling:\n      min-scale: 3\n      max-scale: 1\n",
     "t.yaml:4: models[0].scaling: min-scale (3) must not exceed max-scale (1)"),
    ("models:\n  - name: a\n    source: x\n    scaling:\n      panic-threshold-percentage: 50\n",
     "models[0].scaling.panic-threshold-percentage: Input should be greater than or equal to 110"),
    ("models:\n  - name: a\n    source: x\n    engine:\n      max_model_len: lots\n",
     "t.yaml:5: models[0].engine.max_model_len: Input should be a valid integer"),
    ("models:\n  - name: a\n    source: x\n    resources: {memory: 4 gigs}\n",
     "models[0].resources.memory: '4 gigs' is not a Kubernetes quantity"),
    ("models:\n  - name: a\n    source: x\n  - name: a\n    source: y\n", "model names must be unique; repeated: a"),
    ("models: [\n", "t.yaml:2: (top level): not valid YAML"),
    ("- a\n- b\n", "t.yaml:1: (top level): the spec must be a mapping"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "t.yaml:1: (top level): nested too deeply to be a spec"),
    ("graphs:\n  g:\n    nodes: {first: {routerType: Sequence, steps: []}}\n", "graph 'g': root node not found"),
    ("graphs:\n  g:\n    nodes: {root: {routerType: Sequence, steps: [{serviceName: nosuch}]}}\n",
     "step serviceName 'nosuch' is not a model of this spec"),
    ("triggers:\n  - name: t\n    subscriber: {ref: {kind: Model, name: nosuch}}\n", "trigger 't': no model named 'nosuch'"),
    ("triggers:\n  - name: t\n    subscriber: {}\n", "a destination needs a uri or a ref"),
    # Knative's Destination rules: a uri alone is absolute with a host; beside a ref it is relative
    ("triggers:\n  - name: t\n    subscriber: {uri: not a url}\n", "uri 'not a url' is relative"),
    ("triggers:\n  - name: t\n    subscriber: {uri: 'http://'}\n", "uri 'http://' is relative"),
    ("triggers:\n  - name: t\n    subscriber: {uri: '/answers'}\n", "uri '/answers' is relative"),
    ("models:\n  - name: a\n    source: x\ntriggers:\n  - name: t\n    subscriber: {ref: {kind: Model, name: a}, "
     "uri: 'http://x/y'}\n", "an absolute uri is not allowed with a ref"),
    ("triggers:\n  - name: t\n    subscriber: {uri: 'http://x'}\n    delivery: {deadLetterSink: {uri: dlq}}\n",
     "uri 'dlq' is relative"),
    ("triggers:\n  - name: t\n    subscriber: {uri: 'http://x'}\n    delivery: {backoffDelay: 1s}\n",
     "t.yaml:4: triggers[0].delivery.backoffDelay: backoffDelay must be an ISO 8601 duration"),
    ("triggers:\n  - name: t\n    subscriber: {uri: 'http://x'}\n    filters: [{cesql: x}]\n",
     "the cesql dialect is not supported"),
])
def test_validation_errors(text, expected):
    assert any(expected in line for line in problems(text)), problems(text)


@pytest.mark.parametrize("duration,seconds", [("60s", 60), ("1m30s", 90), ("500ms", 0.5), ("1.5h", 5400), ("0", 0),
                                              ("2h45m", 9900), ("1us", 1e-6)])
def test_go_durations(duration, seconds):
    assert parse_duration(duration) == pytest.approx(seconds)


@pytest.mark.parametrize("duration", ["60", "", "1d", "s", "1s2", " 1s", "1 s", "1h-2m"])
def test_what_go_refuses_is_refused(duration):
    with pytest.raises(ValueError, match="not a Go duration"):
        parse_duration(duration)


@pytest.mark.parametrize("content,expected", [
    (b"models:\n  - name: a\n    source: \"\xff\xfe\"\n", "bad.yaml:3: (top level): byte 0xff is not UTF-8"),
    (("a:\n" + "".join("  " * i + f"b{i}:\n" for i in range(3000))).encode(),
     "bad.yaml:1: (top level): nested too deeply to be a spec"),
])
def test_unreadable_spec_files_are_one_error_line_and_exit_1(tmp_path, content, expected):
    (tmp_path / "bad.yaml").write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "thaw.cli", "validate", "-f", "bad.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and expected in done.stdout + done.stderr, done
    assert "Traceback" not in done.stdout + done.stderr


def test_every_error_is_reported_at_once():
    text = "models:\n  - name: X\n    source: x\n    containerConcurrency: -1\n    timeoutSeconds: 0\n"
    assert len(problems(text)) == 3


def test_knative_annotation_names_are_accepted_and_rendered():
    spec = parse_spec("models:\n  - name: a\n    source: s3://bucket/p\n    scaling:\n"
                      "      autoscaling.knative.dev/max-scale: 3\n      target: 10\n")
    annotations = spec.models[0].scaling.annotations()
    assert annotations["autoscaling.knative.dev/max-scale"] == "3"
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert annotations["autoscaling.knative.dev/target-burst-capacity"] == "0"  # thaw's deliberate default
    assert annotations["autoscaling.knative.dev/window"] == "60s"


def test_validate_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "thaw.cli", "validate", "-f", str(ROOT / "examples/thaw.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "thaw.yaml"
    bad.write_text("models:\n  - name: a\n    source: x\n    scaling: {max-scale: -2}\n")
    out = subprocess.run([sys.executable, "-m", "thaw.cli", "validate", "-f", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{bad}:4: models[0].scaling.max-scale" in out.stderr.replace("\n", "")
