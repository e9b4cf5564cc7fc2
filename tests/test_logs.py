"""Log lines name the call they belong to: `--log-format json` lines carry the call's
request id, method, team and model, in the gateway and in the backend it called."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

from headway.server import logs
from headway.v1 import common_pb2, model_pb2
from tests.stack import HANG_SECONDS


def capture_json() -> tuple[io.StringIO, logging.Handler]:
    """A JSON handler on the root logger, as `--log-format json` installs it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter("test"))
    handler.addFilter(logs._CallFields())
    return out, handler


def test_a_calls_lines_carry_its_request_id_team_and_model_across_services(secured_stack):
    """A ForkModel through the gateway (auth on) with the caller's x-request-id: the
    trainer's line about it (logged in the trainer's own server, reached through the
    gateway) names the same request id, the method, the key's team and the model."""
    stack = secured_stack
    out, handler = capture_json()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        lora = common_pb2.LoraConfig(rank=4, alpha=8)
        stack.gateway.models.ForkModel(
            model_pb2.ForkModelRequest(source="tiny", name="m", lora=lora),
            metadata=[*stack.md("red"), (logs.REQUEST_ID_HEADER, "req-7f3a")],
        )
        stack.gateway.models.ListModels(model_pb2.ListModelsRequest(), metadata=stack.md("red"))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    forked = [x for x in lines if x["message"].startswith("forked m ")]
    assert len(forked) == 1, lines
    line = forked[0]
    assert line["logger"] == "trainer_svc.trainer" and line["level"] == "INFO"
    assert line["request_id"] == "req-7f3a"  # passed on by the gateway
    assert line["method"] == "/headway.v1.ModelService/ForkModel"
    assert line["model"] == "m" and line["team"] == "red"
    assert line["service"] == "test" and line["time"].endswith("Z")
    assert all(x.get("request_id") in (None, "req-7f3a") or x["method"].endswith("ListModels")
               for x in lines)  # fmt: skip


def test_outside_a_call_a_line_has_no_call_fields():
    out, handler = capture_json()
    log = logging.getLogger("headway.test")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("start-up %d", 3)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    line = json.loads(out.getvalue())
    assert line["message"] == "start-up 3" and line["level"] == "WARNING"
    assert not {"request_id", "method", "team", "model"} & set(line)


def test_a_bad_log_format_is_a_usage_error():
    """`--log-format xml` (or $HEADWAY_LOG_FORMAT=xml) stops before anything starts."""
    for argv, env in ((["--log-format", "xml"], {}), ([], {"HEADWAY_LOG_FORMAT": "xml"})):
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", *argv],
            capture_output=True,
            text=True,
            timeout=HANG_SECONDS,  # only catches a hang
            env={**os.environ, **env},
        )
        assert proc.returncode == 2, proc.stderr
        assert "--log-format: must be text or json, not 'xml'" in proc.stderr
