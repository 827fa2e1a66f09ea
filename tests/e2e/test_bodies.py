"""Bodies and serving models as the SDKs see them, against real servers: forms become the JSON
object of their fields and are redacted like JSON, multipart files are summarised, a declared
text body has no field a rule could cover and is sent, a JSON body cut at --max-body-bytes is
withheld (Flask); FastAPI workers spawned by `uvicorn --workers 2` are FastAPI on an event loop."""
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import Server, body, body_json, free_port
from test_capture import by_url

SECRET = "hunter2-secret"
REDACTED = "[CLIENT_REDACTED]"


def never_sent(payloads, *secrets):
    for payload in payloads:
        sent = repr(payload).encode() + body(payload, "request_body") + body(payload, "response_body")
        for secret in secrets:
            assert secret.encode() not in sent, f"{secret} left the agent in {payload['raw_url']}"


def test_form_bodies_are_redacted_as_json_and_files_summarised(flask_server, agent_factory):
    agent = agent_factory(
        [flask_server.pid],
        "--redact-request-body", "$.password",
        "--redact-response-body", "$..password",
    )
    form = requests.post(f"{flask_server.base}/form", data={"user": "bob", "password": SECRET, "tag": ["a", "b"]})
    file_bytes = b"file contents " + SECRET.encode() + b"\n" * 100
    upload = requests.post(
        f"{flask_server.base}/form?kind=multipart",
        data={"user": "ann", "password": SECRET},
        files={"doc": ("report.txt", file_bytes, "text/plain")},
    )
    assert form.status_code == upload.status_code == 200
    assert upload.request.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    payloads = agent.wait_for(2)
    never_sent(payloads, SECRET, "file contents")

    p = by_url(payloads, "/form")
    assert body_json(p, "request_body") == {"user": "bob", "password": REDACTED, "tag": "a"}
    assert body_json(p, "response_body") == {"fields": {"user": ["bob"], "password": REDACTED, "tag": ["a", "b"]}}
    p = by_url(payloads, "/form?kind=multipart")
    assert body_json(p, "request_body") == {
        "user": "ann", "password": REDACTED,
        "doc": {"filename": "report.txt", "content_type": "text/plain", "size": len(file_bytes)},
    }
    assert all("withheld" not in tag for p in payloads for tag in p["tags"])


def test_text_is_sent_under_rules_and_a_cut_json_body_is_withheld(flask_server, agent_factory):
    agent = agent_factory(
        [flask_server.pid],
        "--max-body-bytes", "64",
        "--redact-request-body", "$.password",
        "--redact-response-body", "$.password",
    )
    text = requests.get(f"{flask_server.base}/text?password=plain-text-value")
    assert text.headers["Content-Type"].startswith("text/plain")
    echo = requests.post(f"{flask_server.base}/echo", json={"password": SECRET, "padding": "x" * 200})
    assert echo.status_code == 200
    payloads = agent.wait_for(2)
    never_sent(payloads, SECRET)

    p = by_url(payloads, "/text?password=plain-text-value")
    assert body(p, "response_body") == b"password=plain-text-value\n"
    assert not any("withheld" in tag for tag in p["tags"])
    p = by_url(payloads, "/echo")
    assert p["request_body"] == p["response_body"] == ""
    for direction in ("request", "response"):
        assert f"apitoolkit.{direction}_body_truncated" in p["tags"]
        assert f"apitoolkit.{direction}_body_withheld" in p["tags"]


@pytest.fixture
def uvicorn_workers():
    """FastAPI under `uvicorn --workers 2`: workers started by multiprocessing spawn, whose
    command line names neither uvicorn nor the app."""
    port = free_port()
    server = Server([sys.executable, "-m", "uvicorn", "fastapi_app:app", "--workers", "2",
                     "--port", str(port)], port)
    yield server
    server.stop()


def serving_pids(server_pid: int) -> set:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return {int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()}


def test_uvicorn_spawned_workers_are_fastapi_on_an_event_loop(uvicorn_workers, node_server, agent_factory):
    deadline = time.monotonic() + 15
    while len(serving_pids(uvicorn_workers.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = serving_pids(uvicorn_workers.pid)
    assert len(workers) == 2
    agent = agent_factory([uvicorn_workers.pid])
    seen = set()
    calls = 0

    def call(i):
        # Each call blocks its worker's loop for a while, so concurrent calls reach both workers.
        answer = requests.get(f"{uvicorn_workers.base}/proxy",
                              params={"url": f"{node_server.base}/up/{i}", "hold": "0.2"}, timeout=10).json()
        assert answer["upstream_status"] == 200
        return answer["pid"]

    with ThreadPoolExecutor(4) as pool:
        while seen != workers and calls < 40:
            seen.update(pool.map(call, range(calls, calls + 4)))
            calls += 4
    assert seen == workers
    payloads = agent.wait_for(2 * calls)
    incoming = [p for p in payloads if p["url_path"] == "/proxy"]
    outgoing = [p for p in payloads if p["url_path"].startswith("/up/")]
    assert len(incoming) == len(outgoing) == calls
    assert {p["sdk_type"] for p in incoming} == {"PythonFastApi"}
    assert {p["sdk_type"] for p in outgoing} == {"PythonOutgoing"}
    assert all(p["parent_id"] is None for p in outgoing), "an event loop's thread serves no single request"
    for pid in workers:
        agent.wait_for_log("detected framework", f"pid={pid} ", "PythonFastApi", "thread_per_request=false")


def test_a_fastapi_500_carries_the_traceback_uvicorn_prints_after_it(uvicorn_workers, agent_factory):
    agent = agent_factory([uvicorn_workers.pid])
    rounds = 4
    for _ in range(rounds):
        # /slow is in flight on a loop while /boom fails and uvicorn logs its traceback.
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(requests.get, f"{uvicorn_workers.base}/slow?seconds=0.4", timeout=10)
            time.sleep(0.1)
            boom = requests.get(f"{uvicorn_workers.base}/boom", timeout=10)
            assert boom.status_code == 500 and slow.result().status_code == 200
    payloads = agent.wait_for(2 * rounds)
    booms = [p for p in payloads if p["url_path"] == "/boom"]
    slows = [p for p in payloads if p["url_path"] == "/slow"]
    assert len(booms) == len(slows) == rounds
    for p in booms:
        assert p["status_code"] == 500
        [error] = p["errors"]
        assert (error["error_type"], error["message"]) == ("ValueError", "fastapi boom on purpose")
        assert "Traceback (most recent call last):" in error["stack_trace"]
    assert all(p["errors"] == [] for p in slows)
    agent.stop()
    stats = agent.stats()
    assert stats["held_5xx"] == stats["held_errors_attached"] == rounds
    assert stats["held_released_without_error"] == 0


def test_hypercorn_serves_fastapi_from_a_spawned_worker(agent_factory):
    """hypercorn always runs the app in a worker started by multiprocessing spawn."""
    port = free_port()
    server = Server([sys.executable, "-m", "hypercorn", "fastapi_app:app", "--bind", f"127.0.0.1:{port}"], port)
    try:
        agent = agent_factory([server.pid])
        answer = requests.get(f"{server.base}/hello", timeout=10).json()
        assert answer["pid"] != server.pid
        [payload] = agent.wait_for(1)
    finally:
        server.stop()
    assert (payload["url_path"], payload["sdk_type"]) == ("/hello", "PythonFastApi")
    agent.wait_for_log("detected framework", f"pid={answer['pid']} ", "PythonFastApi", "thread_per_request=false")
