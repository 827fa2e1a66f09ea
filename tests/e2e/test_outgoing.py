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
