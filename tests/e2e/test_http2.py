"""HTTP/2: node's http2 server over h2c (prior knowledge) and over TLS (ALPN h2), driven by
curl and by a node client multiplexing 20 streams on one connection; gRPC (grpcio) seen from
its server and from its client; one payload per stream."""
import json
import os
import subprocess
import sys

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
    assert not any(tag.endswith(("_incomplete", "_truncated")) for p in payloads for tag in p["tags"]), [(p["raw_url"], p["tags"]) for p in payloads]


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


def grpc_messages(payload, field) -> list:
    """The messages of a gRPC body: each a 1-byte flag, a 4-byte length and the message."""
    data, messages = body(payload, field), []
    while data:
        length = int.from_bytes(data[1:5], "big")
        messages.append(data[5:5 + length])
        data = data[5 + length:]
    return messages


def test_grpc_calls_seen_from_the_server_and_from_the_client(agent_factory):
    port = free_port()
    server = Server([sys.executable, str(APPS / "grpc_app.py"), "server"], port)
    client = None
    try:
        server_agent = agent_factory([server.pid])
        client = subprocess.Popen([sys.executable, str(APPS / "grpc_app.py"), "client"],
                                  env={**os.environ, "PORT": str(port)}, cwd=APPS,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "ready"
        client_agent = agent_factory([client.pid])
        out, _ = client.communicate("go\n", timeout=60)
        assert [json.loads(line) for line in out.splitlines()] == [
            {"get": "item:7"},
            {"list": ["shelf-0", "shelf-1", "shelf-2"]},
            {"fail": "NOT_FOUND", "details": "no such item"},
        ]
        for agent in (server_agent, client_agent):
            payloads = agent.wait_for(3)
            assert sorted(p["raw_url"] for p in payloads) == [
                "/shop.Catalog/Fail", "/shop.Catalog/Get", "/shop.Catalog/List"]
            for p in payloads:
                assert (p["method"], p["status_code"], p["proto_major"]) == ("POST", 200, 2)
                assert header(p, "request_headers", "content-type") == ["application/grpc"]
            get = by_url(payloads, "/shop.Catalog/Get")
            assert grpc_messages(get, "request_body") == [b"7"]
            assert grpc_messages(get, "response_body") == [b"item:7"]
            assert header(get, "response_headers", "grpc-status") == ["0"]
            assert get["errors"] == []
            listed = by_url(payloads, "/shop.Catalog/List")
            assert grpc_messages(listed, "response_body") == [b"shelf-0", b"shelf-1", b"shelf-2"]
            fail = by_url(payloads, "/shop.Catalog/Fail")
            assert header(fail, "response_headers", "grpc-status") == ["5"]
            assert [(e["error_type"], e["message"]) for e in fail["errors"]] == [
                ("grpc.StatusCode.NOT_FOUND", "no such item")]
    finally:
        if client and client.poll() is None:
            client.kill()
        server.stop()


def test_an_h2c_upgrade_switches_the_connection_mid_way(agent_factory):
    """curl --http2 on plain HTTP asks hypercorn to upgrade; the upgrading GET is answered
    over HTTP/2 on stream 1, the next request reuses the connection as stream 3."""
    port = free_port()
    server = Server([sys.executable, "-m", "hypercorn", "asgi_app:app", "--bind", f"127.0.0.1:{port}"], port)
    try:
        agent = agent_factory([server.pid])
        result = subprocess.run(
            ["curl", "-sS", "--http2", f"{server.base}/up?x=1", f"{server.base}/second"],
            capture_output=True, text=True, timeout=30, check=True)
        answers = [json.loads(part + "}") for part in result.stdout.split("}") if part]
        assert [a["http_version"] for a in answers] == ["2", "2"]
        payloads = agent.wait_for(2)
    finally:
        server.stop()
    assert sorted(p["raw_url"] for p in payloads) == ["/second", "/up?x=1"]
    assert all(p["status_code"] == 200 for p in payloads), "no 101 of its own"
    up = by_url(payloads, "/up?x=1")
    assert body_json(up, "response_body")["path"] == "/up"
    assert header(up, "request_headers", "upgrade") == ["h2c"]
    assert body_json(by_url(payloads, "/second"), "response_body")["path"] == "/second"
    assert by_url(payloads, "/second")["proto_major"] == 2
    assert agent.stop() == 0
    assert agent.stats()["connections"] == 1


def test_nginx_http2_over_tls_in_front_of_an_http1_upstream(flask_server, certificate, agent_factory, tmp_path):
    """Watching nginx: the browser side is HTTP/2 over TLS, the upstream side plain HTTP/1.1,
    and both are captured."""
    port = free_port()
    (tmp_path / "logs").mkdir()
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"daemon off;\nmaster_process on;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/logs/error.log warn;\nevents {{ worker_connections 64; }}\n"
        "http {\n  access_log off;\n"
        f"  server {{ listen 127.0.0.1:{port} ssl http2; ssl_certificate {certificate.cert};\n"
        f"    ssl_certificate_key {certificate.key};\n"
        f"    location /api/ {{ proxy_pass http://127.0.0.1:{flask_server.port}/;"
        " proxy_http_version 1.1; proxy_set_header Connection \"\"; } }\n}\n")
    nginx = Server(["nginx", "-p", str(tmp_path), "-c", str(config)], port, scheme="https")
    try:
        agent = agent_factory([nginx.pid])
        result = subprocess.run(["curl", "-sS", "-k", "--http2", f"{nginx.base}/api/hello?name=h2"],
                                capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(result.stdout)["args"] == {"name": ["h2"]}
        payloads = agent.wait_for(2)
    finally:
        nginx.process.send_signal(15)
        nginx.process.wait(timeout=10)
    incoming = by_url(payloads, "/api/hello?name=h2")
    outgoing = by_url(payloads, "/hello?name=h2")
    assert (incoming["proto_major"], outgoing["proto_major"], outgoing["proto_minor"]) == (2, 1, 1)
    assert incoming["host"] == f"127.0.0.1:{port}"
    assert body_json(incoming, "response_body") == body_json(outgoing, "response_body")
    assert body_json(incoming, "response_body")["args"] == {"name": ["h2"]}


def test_a_connection_older_than_the_agent_never_gets_a_guessed_header(http2_server, agent_factory):
    """The session's HPACK tables were filled before the agent started: fields indexed then are
    unknown. The payloads carry what was decodable, tagged, and no field the client did not send."""
    client = subprocess.Popen(["node", str(APPS / "node_http2_session.js"), http2_server.base],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        agent = agent_factory([http2_server.pid])
        out, _ = client.communicate("go\n", timeout=30)
        assert [json.loads(line)["path"] for line in out.splitlines()] == ["/later/1", "/later/2"]
        payloads = agent.wait_for(2)
    finally:
        if client.poll() is None:
            client.kill()
    assert sorted(p["raw_url"] for p in payloads) == ["/later/1", "/later/2"]
    sent = {"x-session": "s-123", "x-tenant": "acme"}
    for p in payloads:
        assert "apitoolkit.headers_incomplete" in p["tags"]
        for name, values in p["request_headers"].items():
            assert name not in sent or values == [sent[name]], (name, values)
        assert body_json(p, "response_body")["path"] == p["raw_url"]
    assert agent.stop() == 0
    assert agent.stats()["headers_incomplete"] == 2
