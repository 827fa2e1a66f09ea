"""Faults the agent must survive without hurting the service or pairing wrongly: the agent
killed under load, thousands of short connections reusing fds, a ring buffer far too small,
Pub/Sub unreachable for a minute, and a flood of idle clients on the metrics endpoint."""
import json
import os
import resource
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import PROJECT_ID, Agent, body, body_json, free_port
from test_capture import read_responses


def test_sigkill_under_load_costs_the_service_nothing(gthread_server):
    agent = Agent([gthread_server.pid])
    statuses = []
    stop = threading.Event()

    def load():
        with requests.Session() as session:
            while not stop.is_set():
                statuses.append(session.get(f"{gthread_server.base}/item/1", timeout=5).status_code)

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
    assert served_at_kill > 100
    assert len(statuses) > served_at_kill + 100, "the service keeps serving after the kill"
    assert set(statuses) == {200}


def test_ten_thousand_short_connections_never_cross_pair(gthread_server):
    """Each request on its own connection: the server reuses the same few fds all the time."""
    total = 10_000
    agent = Agent([gthread_server.pid])
    host = f"127.0.0.1:{gthread_server.port}"

    def one(i):
        with socket.create_connection(("127.0.0.1", gthread_server.port)) as sock:
            sock.sendall(f"GET /item/{i} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return read_responses(sock, 1)[0]

    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(one, range(total)))
    assert all(json.loads(b) == {"item": i} for i, b in enumerate(bodies))
    payloads = agent.wait_for(total, timeout=60)
    assert agent.stop() == 0
    stats = agent.stats()
    for p in payloads:
        assert body_json(p, "response_body") == {"item": int(p["url_path"].rsplit("/", 1)[1])}
    assert len(payloads) == total, stats
    assert stats["unpaired_requests"] == stats["unpaired_responses"] == stats["desyncs"] == 0


def test_tiny_ring_buffer_counts_losses_and_never_mispairs(gthread_server):
    agent = Agent([gthread_server.pid], "--ring-buffer-bytes", "65536", "--max-body-bytes", str(4 << 20))

    def big(_):
        return requests.get(f"{gthread_server.base}/big").content

    def small(i):
        return requests.get(f"{gthread_server.base}/item/{i}").json()

    with ThreadPoolExecutor(8) as pool:
        bigs = list(pool.map(big, range(16)))
        smalls = list(pool.map(small, range(200)))
    assert smalls == [{"item": i} for i in range(200)]
    payloads = agent.wait_for(216, timeout=10)
    assert agent.stop() == 0
    stats = agent.stats()
    assert stats["ringbuf_full"] > 0, "a 64 KiB ring cannot hold 2 MB responses"
    for p in payloads:
        if p["url_path"] == "/big":
            complete = body(p, "response_body") == bigs[0]
            assert complete or "apitoolkit.response_body_incomplete" in p["tags"]
        else:
            assert body_json(p, "response_body") == {"item": int(p["url_path"].rsplit("/", 1)[1])}


def test_pubsub_down_for_a_minute_loses_nothing_it_could_keep(flask_server, interruptible_pubsub):
    """The emulator is killed for 60 s under steady traffic, then a new one comes up: every
    payload of the outage is delivered once, none dropped (they fit in the default queue)."""
    pubsub = interruptible_pubsub
    agent = Agent([flask_server.pid], "--pubsub-project", "apitoolkit-test", "--topic", pubsub.topic,
                  "--project-id", PROJECT_ID, env={"PUBSUB_EMULATOR_HOST": pubsub.host})
    sent = []
    with requests.Session() as session:
        for i in range(20):
            session.get(f"{flask_server.base}/item/{i}")
        assert sorted(pubsub.pull(expected=20)) == sorted(f"/item/{i}" for i in range(20))

        pubsub.kill()
        outage_end = time.monotonic() + 60
        while time.monotonic() < outage_end:
            sent.append(f"/item/{1000 + len(sent)}")
            session.get(f"{flask_server.base}{sent[-1]}")
            time.sleep(0.05)
        agent.wait_for_log("publishing failed", timeout=1)

        pubsub.replace()
        for _ in range(20):
            sent.append(f"/item/{1000 + len(sent)}")
            session.get(f"{flask_server.base}{sent[-1]}")
    delivered = pubsub.pull(expected=len(sent), timeout=90)
    agent.wait_for_log("publishing to Pub/Sub again", timeout=1)
    assert agent.stop() == 0
    assert len(sent) > 500
    assert sorted(delivered) == sorted(sent), f"{len(delivered)} of {len(sent)} delivered"
    assert agent.stats()["sink_dropped"] == 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_metrics_endpoint_under_two_thousand_idle_connections(flask_server):
    """Idle clients of /metrics must not exhaust the agent's fds, make it spin, or keep the
    liveness probe from its answer, even under systemd's default soft limit of 1024 files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2_200:
        pytest.skip(f"the test itself needs 2 200 open files (hard limit {hard})")
    port = free_port()
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        agent = Agent([flask_server.pid], "--metrics-address", f"127.0.0.1:{port}")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2_200), hard))
    idle = []
    try:
        for _ in range(2_000):
            client = socket.socket()
            client.settimeout(1)
            try:
                client.connect(("127.0.0.1", port))
                idle.append(client)
            except OSError:
                client.close()
        started = time.monotonic()
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=3)
        answered_in = time.monotonic() - started
        cpu_before = cpu_seconds(agent.process.pid)
        time.sleep(3)
        cores = (cpu_seconds(agent.process.pid) - cpu_before) / 3
        fds = len(os.listdir(f"/proc/{agent.process.pid}/fd"))
        print(f"idle connections opened {len(idle)}, /healthz in {answered_in * 1000:.0f} ms, "
              f"agent {cores:.3f} cores, {fds} fds")
        assert (health.status_code, health.text) == (200, "ok\n")
        assert answered_in < 1
        assert cores < 0.2
        assert fds < 600
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=3).status_code == 200
    finally:
        for client in idle:
            client.close()
        assert agent.stop() == 0
