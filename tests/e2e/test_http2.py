"""HTTP/2: node's http2 server over h2c (prior knowledge) and over TLS (ALPN h2), driven by
curl and by a node client multiplexing 20 streams on one connection; one payload per stream."""
import json
import subprocess
from pathlib import Path

import pytest

from conftest import APPS, Server, body, body_json, free_port, header
from test_capture import by_url


@pytest.fixture(params=["h2c", "tls"])
def http2_server(request, certificate):
    port = free_port()
    tls = request.param == "tls"
    server = Server(["node", str(APPS / "node_http2_server.js")], port,
                    env=certificate.env if tls else None, scheme="https" if tls else "http")
    yield server
    server.stop()


def curl(server, path, *args) -> bytes:
    mode = "--http2" if server.base.startswith("https") else "--http2-prior-knowledge"
    result = subprocess.run(["curl", "-sS", "-k", mode, *args, f"{server.base}{path}"],
                            capture_output=True, timeout=30, check=True)
    return result.stdout


def test_curl_over_http2_gives_one_payload_per_request(http2_server, agent_factory):
    agent = agent_factory([http2_server.pid], "--max-body-bytes", str(4 << 20))
    curl(http2_server, "/hello?name=bob&tag=a&tag=b", "-H", "X-Request-Tag: t1")
    curl(http2_server, "/echo", "-H", "content-type: application/json", "--data", '{"name": "bob"}')
    big = curl(http2_server, "/big")
    assert len(big) == 2 * 1024 * 1024
    payloads = agent.wait_for(3)
    assert sorted(p["raw_url"] for p in payloads) == ["/big", "/echo", "/hello?name=bob&tag=a&tag=b"]

    hello = by_url(payloads, "/hello?name=bob&tag=a&tag=b")
    assert (hello["method"], hello["status_code"]) == ("GET", 200)
    assert (hello["proto_major"], hello["proto_minor"]) == (2, 0)
    assert hello["url_path"] == "/hello"
    assert hello["query_params"] == {"name": ["bob"], "tag": ["a", "b"]}
    assert hello["host"] == f"127.0.0.1:{http2_server.port}"
    assert header(hello, "request_headers", "x-request-tag") == ["t1"]
    assert not any(name.startswith(":") for name in hello["request_headers"])
    assert not any(name.startswith(":") for name in hello["response_headers"])
    assert body_json(hello, "response_body")["path"] == "/hello?name=bob&tag=a&tag=b"
    assert 0 < hello["duration"] < 5e9

    echo = by_url(payloads, "/echo")
    assert (echo["method"], echo["status_code"]) == ("POST", 200)
    assert body_json(echo, "request_body") == {"name": "bob"}
    assert body_json(echo, "response_body")["received"] == '{"name": "bob"}'

    assert body(by_url(payloads, "/big"), "response_body") == big
    assert not any(tag.endswith(("_incomplete", "_truncated")) for p in payloads for tag in p["tags"])


def test_twenty_streams_on_one_connection_and_a_reset_stream(http2_server, agent_factory):
    agent = agent_factory([http2_server.pid])
    result = subprocess.run(["node", str(APPS / "node_http2_client.js"), http2_server.base, "20"],
                            capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1] == {"reset": True}
    payloads = agent.wait_for(21)
    assert len(payloads) == 21, [p["raw_url"] for p in payloads]
    for n in range(20):
        payload = by_url(payloads, f"/echo/{n}?n={n}")
        sent = body_json(payload, "request_body")
        assert sent == {"stream": n, "filler": "x" * (100 * n)}
        received = body_json(payload, "response_body")
        assert received["path"] == f"/echo/{n}?n={n}"
        assert json.loads(received["received"]) == sent
    streams = {header(p, "response_headers", "x-stream")[0] for p in payloads if p["status_code"] == 200}
    assert len(streams) == 20, "twenty distinct streams"
    slow = by_url(payloads, "/slow")
    assert slow["status_code"] == 0
    assert [(e["error_type"], e["message"]) for e in slow["errors"]] == [
        ("StreamReset", "HTTP/2 stream reset with CANCEL")]
    assert agent.stop() == 0
    assert agent.stats()["connections"] == 1
