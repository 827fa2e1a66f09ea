"""Real eBPF capture of real servers: every payload field checked against what was sent."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from conftest import AGENT_BIN, APPS, Server, body, body_json, free_port, header


def by_url(payloads, raw_url):
    matches = [p for p in payloads if p["raw_url"] == raw_url]
    assert len(matches) == 1, f"expected one payload for {raw_url}, got {len(matches)}: {[p['raw_url'] for p in payloads]}"
    return matches[0]


def assert_common_fields(payload, server, sdk_type="PythonFlask"):
    assert payload["host"] == f"127.0.0.1:{server.port}"
    assert payload["proto_major"] == 1 and payload["proto_minor"] == 1
    assert payload["sdk_type"] == sdk_type
    assert payload["duration"] > 0
    assert payload["path_params"] == {}
    assert payload["errors"] == []
    assert payload["parent_id"] is None
    assert payload["project_id"] == "00000000-0000-0000-0000-000000000000"
    assert uuid.UUID(payload["msg_id"]).version == 4
    sent = datetime.fromisoformat(payload["timestamp"])
    assert sent.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - sent).total_seconds()) < 120


def test_get_post_form_and_errors(any_flask_server, agent_factory):
    flask_server = any_flask_server
    agent = agent_factory([flask_server.pid])
    base = flask_server.base
    get = requests.get(f"{base}/hello?name=bob&tag=a&tag=b", headers={"X-Request-Tag": "t1", "Referer": "http://example.com/p"})
    post = requests.post(f"{base}/echo", json={"name": "bob", "nested": {"n": [1, 2]}})
    form = requests.post(f"{base}/form", data={"user": "alice", "color": ["red", "blue"]})
    missing = requests.get(f"{base}/nowhere")
    boom = requests.get(f"{base}/boom")
    assert (get.status_code, post.status_code, form.status_code, missing.status_code, boom.status_code) == (200, 200, 200, 404, 500)

    payloads = agent.wait_for(5)
    assert len(payloads) == 5

    p = by_url(payloads, "/hello?name=bob&tag=a&tag=b")
    assert_common_fields(p, flask_server)
    assert p["method"] == "GET" and p["status_code"] == 200
    assert p["url_path"] == "/hello"
    assert p["query_params"] == {"name": ["bob"], "tag": ["a", "b"]}
    assert header(p, "request_headers", "X-Request-Tag") == ["t1"]
    assert header(p, "request_headers", "User-Agent") == [get.request.headers["User-Agent"]]
    assert header(p, "response_headers", "Content-Type") == ["application/json"]
    assert p["referer"] == "http://example.com/p"
    assert p["request_body"] == ""
    assert body_json(p, "response_body") == get.json()

    p = by_url(payloads, "/echo")
    assert_common_fields(p, flask_server)
    assert p["method"] == "POST" and p["status_code"] == 200
    assert body(p, "request_body") == post.request.body
    assert body_json(p, "response_body") == post.json()
    assert header(p, "request_headers", "Content-Type") == ["application/json"]
    assert p["query_params"] == {}

    p = by_url(payloads, "/form")
    # As apitoolkit-flask sends `request.form.to_dict()`: the first value of each field.
    assert body_json(p, "request_body") == {"user": "alice", "color": "red"}
    assert body_json(p, "response_body") == {"fields": {"user": ["alice"], "color": ["red", "blue"]}}

    assert by_url(payloads, "/nowhere")["status_code"] == 404
    p = by_url(payloads, "/boom")
    assert p["status_code"] == 500
    assert b"Internal Server Error" in body(p, "response_body")


def test_chunked_upload_and_two_megabyte_response(any_flask_server, agent_factory):
    flask_server = any_flask_server
    agent = agent_factory([flask_server.pid], "--max-body-bytes", str(4 * 1024 * 1024))
    parts = [b'{"part": 1, "pad": "' + b"x" * 5000 + b'"}', b"\n", b"tail-" * 1000]

    def chunks():
        yield from parts

    upload = requests.post(f"{flask_server.base}/upload", data=chunks())
    assert upload.request.headers["Transfer-Encoding"] == "chunked"
    assert upload.json() == {"size": sum(map(len, parts))}
    big = requests.get(f"{flask_server.base}/big")
    assert len(big.content) == 2 * 1024 * 1024

    payloads = agent.wait_for(2)
    assert len(payloads) == 2
    p = by_url(payloads, "/upload")
    assert body(p, "request_body") == b"".join(parts)
    assert header(p, "request_headers", "Transfer-Encoding") == ["chunked"]
    p = by_url(payloads, "/big")
    assert body(p, "response_body") == big.content
    assert not any("truncated" in tag for tag in p["tags"])


def test_body_over_the_limit_is_truncated_and_tagged(flask_server, agent_factory):
    agent = agent_factory([flask_server.pid], "--max-body-bytes", "1000")
    big = requests.get(f"{flask_server.base}/big")
    payloads = agent.wait_for(1)
    assert len(payloads) == 1
    assert body(payloads[0], "response_body") == big.content[:1000]
    assert "apitoolkit.response_body_truncated" in payloads[0]["tags"]


def test_hundred_keepalive_requests_on_one_connection(gthread_server, agent_factory):
    agent = agent_factory([gthread_server.pid])
    host = f"127.0.0.1:{gthread_server.port}"
    with socket.create_connection(("127.0.0.1", gthread_server.port)) as sock:
        for i in range(100):
            sock.sendall(f"GET /item/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert json.loads(read_responses(sock, 1)[0]) == {"item": i}
    payloads = agent.wait_for(100)
    assert [p["raw_url"] for p in payloads] == [f"/item/{i}" for i in range(100)]
    assert all(body_json(p, "response_body") == {"item": i} for i, p in enumerate(payloads))
    assert agent.stop() == 0
    stats = agent.stats()
    assert stats["exchanges"] == 100
    assert stats["unpaired_requests"] == stats["unpaired_responses"] == stats["desyncs"] == 0


def read_responses(sock, count):
    """Reads `count` Content-Length framed responses, returning their bodies."""
    data = b""
    bodies = []
    while len(bodies) < count:
        chunk = sock.recv(65536)
        assert chunk, "server closed early"
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            if len(rest) < length:
                break
            bodies.append(rest[:length])
            data = rest[length:]
    return bodies


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_upload_answered_before_its_body_was_read_gets_its_own_response(gthread_server, agent_factory, connection):
    """Routing answers 404 before the server reads a large body; the server then discards the
    body (keep-alive) or closes. The 404 belongs to the POST, the next GET gets its own 200."""
    agent = agent_factory([gthread_server.pid])
    host = f"127.0.0.1:{gthread_server.port}"
    upload = b"x" * 20_000
    with socket.create_connection(("127.0.0.1", gthread_server.port)) as sock:
        sock.sendall(f"POST /nonexistent HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {len(upload)}\r\n\r\n".encode() + upload)
        read_responses(sock, 1)
        if connection == "keep-alive":
            sock.sendall(f"GET /item/5 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert json.loads(read_responses(sock, 1)[0]) == {"item": 5}
    expected = 2 if connection == "keep-alive" else 1
    payloads = agent.wait_for(expected)
    assert len(payloads) == expected
    post = by_url(payloads, "/nonexistent")
    assert (post["method"], post["status_code"]) == ("POST", 404)
    assert "apitoolkit.request_body_incomplete" in post["tags"]
    assert set(body(post, "request_body")) <= {ord("x")}
    if connection == "keep-alive":
        get = by_url(payloads, "/item/5")
        assert (get["method"], get["status_code"]) == ("GET", 200)
        assert body_json(get, "response_body") == {"item": 5}
    assert agent.stop() == 0
    assert agent.stats()["unpaired_responses"] == 0


def test_five_pipelined_requests_pair_in_order(gthread_server, agent_factory):
    agent = agent_factory([gthread_server.pid])
    host = f"127.0.0.1:{gthread_server.port}"
    with socket.create_connection(("127.0.0.1", gthread_server.port)) as sock:
        sock.sendall(b"".join(f"GET /item/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for i in range(5)))
        bodies = read_responses(sock, 5)
    assert [json.loads(b) for b in bodies] == [{"item": i} for i in range(5)]
    payloads = agent.wait_for(5)
    assert len(payloads) == 5
    for i in range(5):
        p = by_url(payloads, f"/item/{i}")
        assert body_json(p, "response_body") == {"item": i}


def test_connection_opened_before_the_agent(gthread_server, agent_factory):
    host = f"127.0.0.1:{gthread_server.port}"
    with socket.create_connection(("127.0.0.1", gthread_server.port)) as sock:
        sock.sendall(f"GET /item/100 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert read_responses(sock, 1) == [b'{"item":100}\n']
        agent = agent_factory([gthread_server.pid])
        for i in range(3):
            sock.sendall(f"GET /item/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert json.loads(read_responses(sock, 1)[0]) == {"item": i}
    payloads = agent.wait_for(3)
    assert [p["raw_url"] for p in payloads] == ["/item/0", "/item/1", "/item/2"]


def test_node_connection_opened_before_the_agent(node_server, agent_factory):
    """node reads with read(2) and writes with writev(2): the agent must register the older
    socket from /proc for those calls to be captured."""
    host = f"127.0.0.1:{node_server.port}"
    with socket.create_connection(("127.0.0.1", node_server.port)) as sock:
        sock.sendall(f"GET /before HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        read_responses(sock, 1)
        agent = agent_factory([node_server.pid])
        for i in range(3):
            request_body = json.dumps({"i": i})
            sock.sendall(
                f"POST /after/{i} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(request_body)}\r\n\r\n{request_body}".encode()
            )
            assert json.loads(read_responses(sock, 1)[0])["path"] == f"/after/{i}"
    payloads = agent.wait_for(3)
    assert [p["raw_url"] for p in payloads] == ["/after/0", "/after/1", "/after/2"]
    for i, p in enumerate(payloads):
        assert p["sdk_type"] == "SDKUnknown"
        assert body_json(p, "request_body") == {"i": i}
        assert body_json(p, "response_body") == {"path": f"/after/{i}", "received": json.dumps({"i": i})}


def test_gunicorn_workers_forked_before_the_agent(gunicorn_server, agent_factory):
    agent = agent_factory([gunicorn_server.pid])
    pids = set()
    for i in range(20):
        response = requests.post(f"{gunicorn_server.base}/echo", json={"i": i})
        pids.add(response.json()["pid"])
    payloads = agent.wait_for(20)
    assert len(payloads) == 20
    for i in range(20):
        p = [p for p in payloads if body_json(p, "request_body") == {"i": i}]
        assert len(p) == 1
        assert_common_fields(p[0], gunicorn_server)
        assert body_json(p[0], "response_body")["received"] == {"i": i}
    assert len(pids) >= 1


def test_gunicorn_worker_forked_after_the_agent(gunicorn_server, agent_factory):
    agent = agent_factory([gunicorn_server.pid])
    # Kill a worker: the master forks a replacement, which the kernel-side fork hook follows.
    before = requests.post(f"{gunicorn_server.base}/echo", json={"probe": 1}).json()["pid"]
    subprocess.run(["kill", "-9", str(before)], check=True)
    seen = set()
    for i in range(30):
        try:
            seen.add(requests.post(f"{gunicorn_server.base}/echo", json={"after": i}).json()["pid"])
        except requests.ConnectionError:
            time.sleep(0.1)
    new_workers = seen - {before}
    assert new_workers, "gunicorn did not replace the worker"
    payloads = agent.wait_for(31)
    captured_pids = {body_json(p, "response_body")["pid"] for p in payloads if p["raw_url"] == "/echo"}
    assert new_workers <= captured_pids


def test_agent_exits_when_the_watched_process_exits(flask_server, agent_factory):
    agent = agent_factory([flask_server.pid])
    flask_server.stop()
    assert agent.process.wait(timeout=10) == 0
    time.sleep(0.2)
    assert any("watched process exited" in line for line in agent.log)


def test_agent_exits_when_the_watched_process_is_a_zombie(agent_factory):
    """A parent that never reaps its exited child leaves a zombie in /proc: it has exited."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "child = subprocess.Popen(['sleep', '300'])\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        child = int(parent.stdout.readline())
        agent = agent_factory([child])
        os.kill(child, signal.SIGKILL)
        assert agent.process.wait(timeout=10) == 0
        assert Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z"
    finally:
        parent.kill()
        parent.wait()


def test_non_http_connections_are_given_up_in_the_kernel(agent_factory):
    """Two loopback streams of 64 MiB that are not HTTP, one after the other in one process:
    each is disabled in the kernel after its first bytes (the second after the first's disable
    was cached), and the HTTP connection that then reuses their fd numbers is captured whole."""
    port = free_port()
    server = Server([sys.executable, str(APPS / "stream_server.py")], port)
    try:
        agent = agent_factory([server.pid])
        for _ in range(2):
            response = requests.get(f"{server.base}/stream?mib=64", timeout=60)
            assert response.text == str(64 << 20)
        with requests.get(f"{server.base}/after", timeout=10) as response:
            assert response.text == "ok"
        payloads = agent.wait_for(3)
        assert agent.stop() == 0
    finally:
        server.stop()
    assert sorted(p["raw_url"] for p in payloads) == ["/after", "/stream?mib=64", "/stream?mib=64"]
    assert [body(p, "response_body") for p in payloads if p["raw_url"] == "/after"] == [b"ok"]
    stats = agent.stats()
    # Both ends of each stream are this process's connections.
    assert stats["not_http_connections"] == 4, stats
    # 256 MiB moved (64 MiB sent and received, twice); what was copied before each disable
    # took effect is a small part of it.
    assert stats["captured_bytes"] < 32 << 20, stats


def test_sendfile_body_is_reported_as_not_captured(gunicorn_server, agent_factory):
    agent = agent_factory([gunicorn_server.pid])
    response = requests.get(f"{gunicorn_server.base}/source")
    assert response.status_code == 200 and b"sendfile" in response.content
    assert requests.get(f"{gunicorn_server.base}/item/1").json() == {"item": 1}
    payloads = agent.wait_for(2)
    assert [p["raw_url"] for p in payloads] == ["/source", "/item/1"]
    p = payloads[0]
    assert p["status_code"] == 200
    assert header(p, "response_headers", "Content-Length") == [str(len(response.content))]
    assert "apitoolkit.response_body_incomplete" in p["tags"]
    assert len(body(p, "response_body")) < len(response.content)
    assert body_json(payloads[1], "response_body") == {"item": 1}


def test_sigterm_flushes_and_exits_cleanly(flask_server, agent_factory):
    agent = agent_factory([flask_server.pid])
    for i in range(5):
        requests.get(f"{flask_server.base}/item/{i}")
    assert agent.stop(signal.SIGTERM) == 0
    time.sleep(0.2)
    assert [p["raw_url"] for p in agent.payloads] == [f"/item/{i}" for i in range(5)]
    assert agent.stats()["exchanges"] == 5


def test_unprivileged_run_is_a_clear_error(flask_server):
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(AGENT_BIN), "--pid", str(flask_server.pid)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("apitoolkit-agent: not allowed to load eBPF programs: run as root")


def test_bad_pid_is_a_clear_error():
    result = subprocess.run([str(AGENT_BIN), "--pid", "999999999"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no process with pid 999999999" in result.stderr


def test_redaction_before_anything_leaves_the_agent(flask_server, agent_factory):
    agent = agent_factory(
        [flask_server.pid],
        "--redact-header", "AUTHORIZATION",
        "--redact-request-body", "$.password",
        "--redact-request-body", "$.card.password",
        "--redact-response-body", "$..password",
    )
    secret = "hunter2-secret"
    requests.post(
        f"{flask_server.base}/echo",
        json={"user": "bob", "password": secret, "card": {"password": secret, "cvv": "1"}},
        headers={"Authorization": f"Bearer {secret}"},
    )
    # No declared type, looks like JSON, does not parse: nothing proves the rule covered it.
    requests.post(f"{flask_server.base}/upload", data=f'{{"password": "{secret}"')
    payloads = agent.wait_for(2)
    assert len(payloads) == 2
    assert all(secret not in json.dumps(p) and secret.encode() not in body(p, "request_body") + body(p, "response_body") for p in payloads)
    echo = by_url(payloads, "/echo")
    assert header(echo, "request_headers", "Authorization") == ["[CLIENT_REDACTED]"]
    assert body_json(echo, "request_body") == {
        "user": "bob", "password": "[CLIENT_REDACTED]", "card": {"password": "[CLIENT_REDACTED]", "cvv": "1"}}
    received = body_json(echo, "response_body")["received"]
    assert received["password"] == received["card"]["password"] == "[CLIENT_REDACTED]"
    upload = by_url(payloads, "/upload")
    assert upload["request_body"] == ""
    assert "apitoolkit.request_body_withheld" in upload["tags"]


@pytest.mark.parametrize("raw", [False, True], ids=["redacted", "raw"])
def test_a_recording_is_redacted_unless_asked_raw_and_replays(flask_server, agent_factory, tmp_path, raw):
    recording = tmp_path / "events.ndjson"
    agent = agent_factory(
        [flask_server.pid],
        "--record", str(recording), *(["--record-raw"] if raw else []),
        "--redact-header", "authorization",
        "--redact-request-body", "$.password",
        "--redact-response-body", "$..password",
    )
    secret = "hunter2-secret"
    requests.post(
        f"{flask_server.base}/echo", json={"user": "bob", "password": secret},
        headers={"Authorization": f"Bearer {secret}"},
    )
    requests.get(f"{flask_server.base}/hello?name=ann")
    assert len(agent.wait_for(2)) == 2
    agent.stop()
    assert (recording.stat().st_mode & 0o777) == 0o600
    # Recorded bytes are text, or base64 after a "b64:" prefix when they are not UTF-8.
    recorded = b"".join(
        base64.b64decode(data[4:]) if data.startswith("b64:") else data.encode()
        for data in (event["data"] for event in map(json.loads, recording.read_text().splitlines())
                     if event["event"] == "data")
    )
    assert (secret.encode() in recorded) == raw
    assert any("recording holds the traffic unredacted" in line for line in agent.log) == raw

    # Replayed without any rule, the redacted recording still gives only redacted values.
    replay = subprocess.run([str(AGENT_BIN), "replay", str(recording)], capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    payloads = [json.loads(line) for line in replay.stdout.splitlines()]
    assert sorted((p["method"], p["raw_url"], p["status_code"]) for p in payloads) == [
        ("GET", "/hello?name=ann", 200), ("POST", "/echo", 200)]
    echo = by_url(payloads, "/echo")
    assert (body_json(echo, "request_body")["password"] == secret) == raw
    assert (header(echo, "request_headers", "Authorization") == [f"Bearer {secret}"]) == raw


def test_invalid_jsonpath_is_a_clear_error(flask_server):
    result = subprocess.run(
        [str(AGENT_BIN), "--pid", str(flask_server.pid), "--redact-request-body", "$[?broken"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert 'invalid JSONPath "$[?broken"' in result.stderr
