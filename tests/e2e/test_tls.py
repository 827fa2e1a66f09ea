"""HTTPS captured from TLS-library uprobes: the same payloads as plain HTTP, for Python's
OpenSSL (werkzeug, gunicorn) and node's statically linked OpenSSL, as server and as client."""
import socket
import ssl
import subprocess
import sys
import time

import pytest
import requests

from conftest import APPS, Server, body, body_json, free_port, header
from test_capture import assert_common_fields, by_url, read_responses

MAX_BODY = str(4 * 1024 * 1024)


def https_session(certificate):
    """A keep-alive session that trusts the test certificate."""
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override session.verify
    session.verify = str(certificate.cert)
    return session


def assert_no_ciphertext_parsed(agent, tls_connections):
    assert agent.stop() == 0
    stats = agent.stats()
    assert stats["tls_connections"] == tls_connections
    assert stats["malformed_messages"] == stats["not_http_connections"] == stats["desyncs"] == 0
    assert stats["unreadable_tls_connections"] == stats["tls_unmapped"] == 0


def test_flask_over_https(https_flask_server, certificate, agent_factory):
    server = https_flask_server
    agent = agent_factory([server.pid], "--max-body-bytes", MAX_BODY)
    assert any("TLS plaintext probed" in line and "libssl.so" in line for line in agent.log)
    with https_session(certificate) as session:
        get = session.get(f"{server.base}/hello?name=bob&tag=a&tag=b", headers={"X-Request-Tag": "t1"})
        post = session.post(f"{server.base}/echo", json={"name": "bob", "nested": {"n": [1, 2]}})
        big = session.get(f"{server.base}/big")
    curl = subprocess.run(["curl", "-s", "--cacert", str(certificate.cert), f"{server.base}/item/7"],
                          check=True, capture_output=True)
    assert (get.status_code, post.status_code, len(big.content)) == (200, 200, 2 * 1024 * 1024)

    payloads = agent.wait_for(4)
    assert len(payloads) == 4
    p = by_url(payloads, "/hello?name=bob&tag=a&tag=b")
    assert_common_fields(p, server)
    assert p["method"] == "GET" and p["status_code"] == 200
    assert p["query_params"] == {"name": ["bob"], "tag": ["a", "b"]}
    assert header(p, "request_headers", "X-Request-Tag") == ["t1"]
    assert body_json(p, "response_body") == get.json()
    p = by_url(payloads, "/echo")
    assert_common_fields(p, server)
    assert body(p, "request_body") == post.request.body
    assert body_json(p, "response_body") == post.json()
    p = by_url(payloads, "/big")
    assert body(p, "response_body") == big.content
    assert p["tags"] == []
    p = by_url(payloads, "/item/7")
    assert header(p, "request_headers", "User-Agent")[0].startswith("curl/")
    assert body(p, "response_body") == curl.stdout
    # werkzeug closes every connection; the gthread session reuses one for its 3 requests.
    assert_no_ciphertext_parsed(agent, tls_connections=4 if "flask_app.py" in str(server.process.args) else 2)


def test_node_https_server_keepalive_and_big_response(https_node_server, certificate, agent_factory):
    """node feeds OpenSSL from memory buffers (no socket syscall inside SSL_read/SSL_write): the
    connection comes from the thread's socket I/O around the call."""
    server = https_node_server
    agent = agent_factory([server.pid], "--max-body-bytes", MAX_BODY)
    assert any("TLS plaintext probed" in line and "node" in line for line in agent.log)
    with https_session(certificate) as session:
        posts = [session.post(f"{server.base}/post/{i}", data=f"body-{i}") for i in range(10)]
        big = session.get(f"{server.base}/big")
    assert [r.json()["received"] for r in posts] == [f"body-{i}" for i in range(10)]

    payloads = agent.wait_for(11)
    assert [p["raw_url"] for p in payloads] == [f"/post/{i}" for i in range(10)] + ["/big"]
    for i, p in enumerate(payloads[:10]):
        assert_common_fields(p, server, sdk_type="SDKUnknown")
        assert body(p, "request_body") == f"body-{i}".encode()
        assert body_json(p, "response_body") == {"path": f"/post/{i}", "received": f"body-{i}"}
    assert body(payloads[10], "response_body") == big.content
    assert_no_ciphertext_parsed(agent, tls_connections=1)


@pytest.mark.parametrize("server_fixture", ["https_gthread_server", "https_node_server"])
def test_tls_connection_opened_before_the_agent(server_fixture, request, certificate, agent_factory):
    """The agent registers the older socket from /proc; Python's SSL calls name it through
    recv/send inside them, node's through the socket I/O around them."""
    server = request.getfixturevalue(server_fixture)
    context = ssl.create_default_context(cafile=str(certificate.cert))
    host = f"127.0.0.1:{server.port}"
    plain = socket.create_connection(("127.0.0.1", server.port))
    with context.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
        sock.sendall(f"GET /item/100 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        read_responses(sock, 1)
        agent = agent_factory([server.pid])
        bodies = []
        for i in range(3):
            sock.sendall(f"GET /item/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            bodies += read_responses(sock, 1)
    payloads = agent.wait_for(3)
    assert [p["raw_url"] for p in payloads] == ["/item/0", "/item/1", "/item/2"]
    assert [body(p, "response_body") for p in payloads] == bodies
    assert b'"item":1' in bodies[1] or b'"path":"/item/1"' in bodies[1]


def test_outgoing_https_call_is_a_client_exchange(certificate, https_node_server, agent_factory):
    """Flask calls a local HTTPS service with requests: the agent sees both sides."""
    port = free_port()
    flask_server = Server([sys.executable, str(APPS / "flask_app.py")], port, env={"UPSTREAM_CA": str(certificate.cert)})
    try:
        agent = agent_factory([flask_server.pid])
        upstream = f"{https_node_server.base}/upstream?q=1"
        response = requests.get(f"{flask_server.base}/proxy", params={"url": upstream})
        assert response.json()["upstream_status"] == 200
        payloads = agent.wait_for(2)
    finally:
        flask_server.stop()
    assert len(payloads) == 2
    incoming = by_url(payloads, f"/proxy?url={requests.utils.quote(upstream, safe='')}")
    assert incoming["sdk_type"] == "PythonFlask"
    outgoing = by_url(payloads, "/upstream?q=1")
    assert outgoing["sdk_type"] == "PythonOutgoing"
    assert outgoing["parent_id"] == incoming["msg_id"]
    assert outgoing["host"] == f"127.0.0.1:{https_node_server.port}"
    assert outgoing["method"] == "GET" and outgoing["status_code"] == 200
    assert body_json(outgoing, "response_body") == {"path": "/upstream?q=1", "received": ""}
    assert header(outgoing, "request_headers", "User-Agent")[0].startswith("python-requests/")


def test_tls_library_loaded_after_the_agent_started(https_node_server, certificate, agent_factory):
    client = subprocess.Popen([sys.executable, str(APPS / "late_tls_client.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        agent = agent_factory([client.pid])
        agent.wait_for_log("no TLS library mapped", f"pid={client.pid}")
        client.stdin.write("load\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "loaded"
        agent.wait_for_log("TLS plaintext probed", f"pid={client.pid}", "libssl.so")
        client.stdin.write(f"{https_node_server.base}/late {certificate.cert}\n")
        client.stdin.flush()
        response = client.stdout.readline().strip()
        payloads = agent.wait_for(1)
        # Past the next full rescan (every 5 s): an unchanged process is not reported again.
        time.sleep(5.5)
        probed = [line for line in agent.log if "TLS plaintext probed" in line and f"pid={client.pid}" in line]
        assert len(probed) == 1, probed
    finally:
        client.kill()
        client.wait()
    assert len(payloads) == 1
    p = payloads[0]
    assert p["raw_url"] == "/late" and p["status_code"] == 200
    assert p["sdk_type"] == "SDKUnknown"
    assert body(p, "response_body").decode() == response
