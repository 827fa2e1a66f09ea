"""Outgoing requests and errors of the watched service, linked to the incoming request that
caused them (real eBPF, real Flask under werkzeug and gunicorn)."""
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import APPS, Server, body, body_json, free_port, start_gunicorn

CONCURRENT_CLIENTS = 8
REQUESTS = 24


def flask_server(kind, certificate):
    env = {"UPSTREAM_CA": str(certificate.cert)}
    if kind == "werkzeug":
        return Server([sys.executable, str(APPS / "flask_app.py")], free_port(), env=env)
    return start_gunicorn("--worker-class", "gthread", "--threads", "8", env=env)


@pytest.mark.parametrize("kind", ["werkzeug", "gthread"])
@pytest.mark.parametrize("upstream_fixture", ["node_server", "https_node_server"])
def test_outgoing_calls_link_to_their_request_under_concurrency(kind, upstream_fixture, request, certificate,
                                                                agent_factory):
    upstream = request.getfixturevalue(upstream_fixture)
    server = flask_server(kind, certificate)
    try:
        agent = agent_factory([server.pid])

        def call(i):
            response = requests.get(f"{server.base}/proxy", params={"url": f"{upstream.base}/up/{i}"}, timeout=30)
            assert response.json()["upstream_status"] == 200
            return response.request.path_url

        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
            proxy_urls = list(pool.map(call, range(REQUESTS)))
        payloads = agent.wait_for(2 * REQUESTS)
    finally:
        server.stop()
    assert len(payloads) == 2 * REQUESTS
    incoming = {p["raw_url"]: p for p in payloads if p["sdk_type"] == "PythonFlask"}
    outgoing = {p["raw_url"]: p for p in payloads if p["sdk_type"] == "PythonOutgoing"}
    assert sorted(incoming) == sorted(proxy_urls)
    assert sorted(outgoing) == sorted(f"/up/{i}" for i in range(REQUESTS))
    for i, proxy_url in enumerate(proxy_urls):
        parent, child = incoming[proxy_url], outgoing[f"/up/{i}"]
        assert child["parent_id"] == parent["msg_id"], f"request {i}"
        assert parent["parent_id"] is None
        assert child["host"] == f"127.0.0.1:{upstream.port}"
        assert body_json(child, "response_body") == {"path": f"/up/{i}", "received": ""}
        assert body_json(parent, "response_body")["upstream_body"] == body(child, "response_body").decode()
    assert len({p["msg_id"] for p in payloads}) == 2 * REQUESTS


@pytest.fixture(params=["werkzeug", "gunicorn-sync"])
def raising_server(request):
    if request.param == "werkzeug":
        server = Server([sys.executable, str(APPS / "flask_app.py")], free_port())
    else:
        server = start_gunicorn("--workers", "2")
    yield server
    server.stop()


def test_unhandled_exception_is_attached_to_its_request(raising_server, agent_factory):
    agent = agent_factory([raising_server.pid])
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda path: requests.get(f"{raising_server.base}{path}").status_code,
                                 ["/boom", "/hello", "/boom", "/item/3"]))
    assert statuses == [500, 200, 500, 200]
    payloads = agent.wait_for(4)
    assert len(payloads) == 4
    for p in payloads:
        if p["raw_url"] != "/boom":
            assert p["errors"] == []
            continue
        assert p["status_code"] == 500
        assert len(p["errors"]) == 1
        error = p["errors"][0]
        assert (error["error_type"], error["message"]) == ("ValueError", "boom on purpose")
        assert (error["root_error_type"], error["root_error_message"]) == ("ValueError", "boom on purpose")
        assert error["stack_trace"].startswith("Traceback (most recent call last):")
        assert 'raise ValueError("boom on purpose")' in error["stack_trace"]
        assert error["when"] <= p["timestamp"]
    assert agent.stop() == 0
    assert agent.stats()["errors_attached"] == 2


@pytest.fixture
def single_worker_server():
    """One gunicorn sync worker: one thread serves every request, so its stderr is one text."""
    server = start_gunicorn("--workers", "1")
    yield server
    server.stop()


def test_a_traceback_longer_than_a_chunk_keeps_its_error_and_leaks_nowhere(single_worker_server, agent_factory):
    agent = agent_factory([single_worker_server.pid])
    assert requests.get(f"{single_worker_server.base}/deep?depth=3000").status_code == 500
    assert requests.get(f"{single_worker_server.base}/boom").status_code == 500
    payloads = agent.wait_for(2)
    deep = next(p for p in payloads if p["raw_url"].startswith("/deep"))
    boom = next(p for p in payloads if p["raw_url"] == "/boom")
    assert len(deep["errors"]) == 1, deep["errors"]
    error = deep["errors"][0]
    assert (error["error_type"], error["message"]) == ("ValueError", "deep failure")
    assert error["stack_trace"].startswith("Traceback (most recent call last):")
    assert "bytes not captured ...]" in error["stack_trace"]
    assert [e["message"] for e in boom["errors"]] == ["boom on purpose"]
    assert ", in f1" not in boom["errors"][0]["stack_trace"], "the deep traceback leaked"
    assert agent.stop() == 0
    assert agent.stats()["errors_attached"] == 2


def test_outgoing_and_errors_can_be_switched_off(node_server, certificate, agent_factory):
    server = flask_server("werkzeug", certificate)
    try:
        agent = agent_factory([server.pid], "--capture-outgoing", "false", "--capture-errors", "false")
        assert requests.get(f"{server.base}/proxy", params={"url": f"{node_server.base}/up"}).status_code == 200
        assert requests.get(f"{server.base}/boom").status_code == 500
        payloads = agent.wait_for(2)
    finally:
        server.stop()
    assert sorted(p["url_path"] for p in payloads) == ["/boom", "/proxy"]
    assert all(p["errors"] == [] and p["sdk_type"] == "PythonFlask" for p in payloads)


class BadUpstream:
    """Accepts HTTP requests and never answers them well: `hang` keeps the connection open
    without a response, `reset` reads the request and resets the connection."""

    def __init__(self, mode):
        import socket
        import struct
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held = []

        def serve():
            while True:
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    return
                conn.recv(65536)
                if mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                else:
                    self.held.append(conn)

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_refused_call_is_an_error_of_its_request(certificate, agent_factory):
    closed_port = free_port()
    server = flask_server("werkzeug", certificate)
    try:
        agent = agent_factory([server.pid])
        response = requests.get(f"{server.base}/proxy", params={"url": f"http://127.0.0.1:{closed_port}/x"})
        assert response.status_code == 500
        payloads = agent.wait_for(1)
    finally:
        server.stop()
    assert len(payloads) == 1, "a refused call sent no request: no outgoing payload"
    errors = {error["error_type"]: error for error in payloads[0]["errors"]}
    assert errors["ConnectionRefusedError"]["message"] == f"connection refused (127.0.0.1:{closed_port})"
    assert "ConnectionError" in errors, "the traceback Flask printed"


@pytest.mark.parametrize("mode,error_type", [("hang", "NoResponseError"), ("reset", "ConnectionResetError")])
def test_call_without_response_is_an_outgoing_payload_with_its_error(mode, error_type, certificate, agent_factory):
    upstream = BadUpstream(mode)
    server = flask_server("werkzeug", certificate)
    try:
        agent = agent_factory([server.pid])
        response = requests.get(f"{server.base}/proxy",
                                params={"url": f"http://127.0.0.1:{upstream.port}/slow?x=1", "timeout": "0.5"})
        assert response.status_code == 500
        payloads = agent.wait_for(2)
    finally:
        server.stop()
        upstream.close()
    assert len(payloads) == 2
    outgoing = next(p for p in payloads if p["sdk_type"] == "PythonOutgoing")
    incoming = next(p for p in payloads if p["sdk_type"] == "PythonFlask")
    assert outgoing["raw_url"] == "/slow?x=1" and outgoing["method"] == "GET"
    assert outgoing["status_code"] == 0 and outgoing["response_body"] == ""
    assert outgoing["parent_id"] == incoming["msg_id"]
    assert [e["error_type"] for e in outgoing["errors"]] == [error_type]
    assert error_type in [e["error_type"] for e in incoming["errors"]]
    if mode == "hang":
        assert outgoing["duration"] >= 400_000_000, "waited for the client's 0.5 s timeout"
