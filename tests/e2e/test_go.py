"""Go's crypto/tls, probed in the executable (no TLS library): a net/http HTTPS server built
plain, stripped and as PIE, HTTP/1.1 and h2, outgoing HTTPS calls linked to the request whose
handler (or a goroutine it started) made them, connections older than the agent, and a SIGKILLed
agent that costs the service nothing."""
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import APPS, Server, body, body_json, free_port, header
from test_capture import assert_common_fields, by_url, read_responses
from test_tls import MAX_BODY, assert_no_ciphertext_parsed, https_session

CONCURRENT_CLIENTS = 8
REQUESTS = 24
BIG_BODY = bytes(i % 256 for i in range(2 * 1024 * 1024))


@pytest.fixture(scope="session")
def go_builds(tmp_path_factory):
    """tests/apps/go_tls built three ways with the machine's Go toolchain."""
    out = tmp_path_factory.mktemp("go")
    builds = {}
    for kind, flags in {"plain": [], "stripped": ["-ldflags=-s -w"], "pie": ["-buildmode=pie"]}.items():
        builds[kind] = out / f"server-{kind}"
        subprocess.run(["go", "build", *flags, "-o", str(builds[kind]), "."], cwd=APPS / "go_tls", check=True)
    return builds


def go_server(go_builds, certificate, kind="plain", http2=True, upstream=None, upstream_http2=False):
    env = {**certificate.env, "HTTP2": "1" if http2 else "0", "UPSTREAM_HTTP2": "1" if upstream_http2 else "0"}
    if upstream is not None:
        env["UPSTREAM"] = upstream.base
    return Server([str(go_builds[kind])], free_port(), env=env, scheme="https")


def go_version():
    return subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True).stdout.strip()


def assert_probed(agent, server):
    assert any(f"Go crypto/tls probed pid={server.pid} go={go_version()}" in line for line in agent.log), agent.log


def test_go_https_server_over_http1_from_python_and_curl(go_builds, certificate, agent_factory):
    server = go_server(go_builds, certificate, http2=False)
    try:
        agent = agent_factory([server.pid], "--max-body-bytes", MAX_BODY)
        assert_probed(agent, server)
        with https_session(certificate) as session:
            get = session.get(f"{server.base}/hello?name=bob&tag=a&tag=b", headers={"X-Request-Tag": "t1"})
            post = session.post(f"{server.base}/echo", json={"name": "bob", "nested": {"n": [1, 2]}})
            big = session.get(f"{server.base}/big")
        curl = subprocess.run(["curl", "-sS", "--cacert", str(certificate.cert), f"{server.base}/item/7"],
                              check=True, capture_output=True)
        assert (get.status_code, post.status_code, big.content) == (200, 200, BIG_BODY)
        payloads = agent.wait_for(4)
    finally:
        server.stop()
    assert len(payloads) == 4
    p = by_url(payloads, "/hello?name=bob&tag=a&tag=b")
    assert_common_fields(p, server, sdk_type="GoBuiltIn")
    assert p["method"] == "GET" and p["status_code"] == 200
    assert p["query_params"] == {"name": ["bob"], "tag": ["a", "b"]}
    assert header(p, "request_headers", "X-Request-Tag") == ["t1"]
    assert body_json(p, "response_body") == get.json()
    p = by_url(payloads, "/echo")
    assert body(p, "request_body") == post.request.body
    assert body_json(p, "response_body") == post.json()
    assert body_json(p, "response_body")["received"] == post.request.body.decode()
    assert body(by_url(payloads, "/big"), "response_body") == BIG_BODY
    p = by_url(payloads, "/item/7")
    assert header(p, "request_headers", "User-Agent")[0].startswith("curl/")
    assert body(p, "response_body") == curl.stdout
    # The keep-alive session's three requests share one connection; curl opens the other.
    assert_no_ciphertext_parsed(agent, tls_connections=2)


@pytest.mark.parametrize("kind", ["stripped", "pie"])
def test_stripped_and_pie_go_servers_over_h2(kind, go_builds, certificate, agent_factory):
    """h2 (Go's default over TLS) from the same probes, found through .gopclntab."""
    server = go_server(go_builds, certificate, kind=kind)
    try:
        agent = agent_factory([server.pid], "--max-body-bytes", MAX_BODY)
        assert_probed(agent, server)
        curl = ["curl", "-sS", "--http2", "--cacert", str(certificate.cert)]
        get = subprocess.run([*curl, f"{server.base}/hello?kind={kind}"], check=True, capture_output=True)
        post = subprocess.run([*curl, "-H", "Content-Type: application/json", "-d", '{"n": 1}', f"{server.base}/echo"],
                              check=True, capture_output=True)
        big = subprocess.run([*curl, f"{server.base}/big"], check=True, capture_output=True)
        assert json.loads(get.stdout)["proto"] == "HTTP/2.0" and big.stdout == BIG_BODY
        payloads = agent.wait_for(3)
    finally:
        server.stop()
    assert all(p["proto_major"] == 2 and p["status_code"] == 200 for p in payloads)
    assert body(by_url(payloads, f"/hello?kind={kind}"), "response_body") == get.stdout
    p = by_url(payloads, "/echo")
    assert (body(p, "request_body"), body(p, "response_body")) == (b'{"n": 1}', post.stdout)
    assert body(by_url(payloads, "/big"), "response_body") == BIG_BODY


@pytest.mark.parametrize("upstream_http2", [False, True], ids=["http1-upstream", "h2-upstream"])
def test_go_outgoing_calls_link_to_the_request_that_made_them(upstream_http2, go_builds, certificate,
                                                              agent_factory):
    """Each handler calls out over HTTPS, itself (/call/direct) or from a goroutine it starts
    (/call/spawned); net/http's client writes and reads on goroutines of its own. Over HTTP/2
    the calls share one connection whose frames one goroutine reads: no link is made there
    (never the wrong one)."""
    upstream_app = "node_http2_server.js" if upstream_http2 else "node_server.js"
    upstream = Server(["node", str(APPS / upstream_app)], free_port(), env=certificate.env, scheme="https")
    server = go_server(go_builds, certificate, http2=False, upstream=upstream, upstream_http2=upstream_http2)
    try:
        agent = agent_factory([server.pid])
        assert agent.wait_for_log("Go goroutine links probed")

        def call(i):
            path = f"/call/{'direct' if i % 2 else 'spawned'}/{i}"
            response = requests.get(f"{server.base}{path}", verify=str(certificate.cert), timeout=30)
            assert json.loads(response.json()["received"]) == {"path": f"/downstream/{i}", "received": ""}
            return path

        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
            paths = list(pool.map(call, range(REQUESTS)))
        payloads = agent.wait_for(2 * REQUESTS)
        assert agent.stop() == 0
    finally:
        server.stop()
        upstream.stop()
    assert len(payloads) == 2 * REQUESTS
    for i, path in enumerate(paths):
        incoming = by_url(payloads, path)
        outgoing = by_url(payloads, f"/downstream/{i}")
        assert incoming["parent_id"] is None and incoming["sdk_type"] == "GoBuiltIn"
        assert outgoing["sdk_type"] == "GoOutgoing"
        assert outgoing["proto_major"] == (2 if upstream_http2 else 1)
        expected_parent = None if upstream_http2 else incoming["msg_id"]
        assert outgoing["parent_id"] == expected_parent, path
        assert outgoing["host"] == f"127.0.0.1:{upstream.port}"
        assert body_json(outgoing, "response_body")["path"] == f"/downstream/{i}"
    assert agent.stats()["outgoing_with_parent"] == (0 if upstream_http2 else REQUESTS)


def test_go_connections_older_than_the_agent(go_builds, certificate, https_node_server, agent_factory):
    """A server connection and a client program's keep-alive connection, both open before the
    agent starts. Each has a goroutine already waiting in `Read` when the probes attach (the
    server's background read, the client's read loop): what that read returns is never seen,
    so the first exchange on each is lost and counted as a gap, never paired with the next
    message. Later requests are captured; the client serves no request, so its calls have no
    parent."""
    server = go_server(go_builds, certificate, http2=False)
    client = subprocess.Popen([str(go_builds["plain"])], cwd=APPS, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env={**certificate.env, "GO_CLIENT": https_node_server.base})
    context = ssl.create_default_context(cafile=str(certificate.cert))
    host = f"127.0.0.1:{server.port}"
    try:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port)),
                                 server_hostname="127.0.0.1") as sock:
            sock.sendall(f"GET /item/100 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            read_responses(sock, 1)
            client.stdin.write("/before\n")
            client.stdin.flush()
            assert "/before" in client.stdout.readline()
            agent = agent_factory([server.pid, client.pid])
            bodies = []
            for i in range(3):
                sock.sendall(f"GET /item/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                bodies += read_responses(sock, 1)
                client.stdin.write(f"/client/{i}\n")
                client.stdin.flush()
                assert f"/client/{i}" in client.stdout.readline()
        payloads = agent.wait_for(4)
        assert agent.stop() == 0
    finally:
        client.kill()
        server.stop()
    served = [p for p in payloads if p["sdk_type"] == "GoBuiltIn"]
    assert [p["raw_url"] for p in served] == ["/item/1", "/item/2"]
    assert [body(p, "response_body") for p in served] == bodies[1:]
    calls = [p for p in payloads if p["sdk_type"] == "GoOutgoing"]
    assert [p["raw_url"] for p in calls] == ["/client/1", "/client/2"]
    assert all(p["parent_id"] is None and p["status_code"] == 200 for p in calls)
    assert [body_json(p, "response_body")["path"] for p in calls] == ["/client/1", "/client/2"]
    stats = agent.stats()
    assert stats["gaps"] == 2 and stats["failed_calls"] == 0


def test_sigkilled_agent_costs_the_go_service_nothing(go_builds, certificate):
    """Probes on every ret of Read and on goroutine creation are removed with the agent's
    process: the service keeps serving HTTPS without a failed request."""
    from conftest import Agent
    server = go_server(go_builds, certificate, http2=False)
    statuses = []
    stop = threading.Event()

    def load():
        with https_session(certificate) as session:
            while not stop.is_set():
                statuses.append(session.get(f"{server.base}/item/1", timeout=10).status_code)

    try:
        agent = Agent([server.pid])
        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(1.5)
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(timeout=10)
        served_at_kill = len(statuses)
        time.sleep(1.5)
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
        assert server.process.poll() is None, "the Go service is alive"
    finally:
        stop.set()
        server.stop()
    assert served_at_kill > 50
    assert len(statuses) > served_at_kill + 50, "the service keeps serving after the kill"
    assert set(statuses) == {200}
