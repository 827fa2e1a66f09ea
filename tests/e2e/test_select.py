"""Selecting processes beyond --pid: by port, executable, cgroup and --all, including servers
started (and restarted) after the agent; plus `check` and `config --print`."""
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from conftest import AGENT_BIN, APPS, Agent, Server, free_port


def agent_without_pids(*args):
    return Agent([], *args)


def flask(port, env=None):
    return Server([sys.executable, str(APPS / "flask_app.py")], port, env=env)


def payload_urls(agent, count):
    return [p["raw_url"] for p in agent.wait_for(count)]


def test_port_selects_a_server_started_later_and_again_after_a_restart():
    port = free_port()
    agent = agent_without_pids("--port", str(port))
    try:
        for round_ in range(2):
            server = flask(port)
            try:
                agent.wait_for_log("watching new processes", str(server.pid))
                assert requests.get(f"{server.base}/item/{round_}").status_code == 200
                assert f"/item/{round_}" in payload_urls(agent, round_ + 1)
            finally:
                server.stop()
        assert agent.process.poll() is None, "the agent keeps waiting for the next server"
    finally:
        assert agent.stop() == 0
    assert agent.stats()["exchanges"] == 2


def test_exe_selects_by_program_name():
    agent = agent_without_pids("--exe", "node")
    port = free_port()
    server = Server(["node", str(APPS / "node_server.js")], port)
    try:
        agent.wait_for_log("watching new processes", str(server.pid))
        requests.post(f"{server.base}/by-exe", data="x")
        urls = payload_urls(agent, 1)
    finally:
        server.stop()
        agent.stop()
    assert urls == ["/by-exe"]


@pytest.mark.parametrize("selected_by", ["port", "exe"])
def test_the_first_request_of_a_server_started_later_is_captured(selected_by, tmp_path):
    """The kernel selects a process the moment it binds a --port port or executes an --exe
    program; /proc, scanned once a second, only confirms it."""
    port = free_port()
    program = tmp_path / "apitk-first-req"  # node under a name no other process has
    program.symlink_to(shutil.which("node"))
    args = ("--port", str(port)) if selected_by == "port" else ("--exe", program.name)
    agent = agent_without_pids(*args)
    try:
        server = Server([str(program), str(APPS / "node_server.js")], port)
        try:
            # At once: no waiting for the agent's "watching new processes".
            assert requests.get(f"{server.base}/first").status_code == 200
            urls = payload_urls(agent, 1)
            agent.wait_for_log("watching new processes", str(server.pid))
        finally:
            server.stop()
    finally:
        assert agent.stop() == 0
    assert urls == ["/first"]


def test_all_selects_every_process_but_the_agent():
    agent = agent_without_pids("--all")
    server = flask(free_port())
    marker = f"/item/{uuid.uuid4().int % 1000000}"
    try:
        # Selected in the kernel from the first syscall: no discovery wait is needed.
        assert requests.get(f"{server.base}{marker}").status_code == 200
        # This test's own process is watched too: its side of the call is a second payload.
        payloads = agent.wait_for(2)
    finally:
        server.stop()
        agent.stop()
    mine = [p for p in payloads if p["raw_url"] == marker]
    assert [p["sdk_type"] for p in mine if p["parent_id"] is None and p["host"].endswith(str(server.port))].count(
        "PythonFlask") == 1
    assert len(mine) == 2, [p["sdk_type"] for p in mine]


def cgroup2_root() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    pytest.skip("cgroup v2 is not mounted")


def test_cgroup_selects_only_the_process_inside_it():
    root = cgroup2_root()
    name = f"apitoolkit-e2e-{uuid.uuid4().hex[:8]}"
    cgroup = root / name
    cgroup.mkdir()
    inside = flask(free_port())
    outside = flask(free_port())
    try:
        (cgroup / "cgroup.procs").write_text(str(inside.pid))
        agent = agent_without_pids("--cgroup", f"/{name}")
        try:
            assert requests.get(f"{inside.base}/item/1").status_code == 200
            assert requests.get(f"{outside.base}/item/2").status_code == 200
            urls = payload_urls(agent, 1)
        finally:
            agent.stop()
        assert urls == ["/item/1"]
    finally:
        inside.stop()
        outside.stop()
        cgroup.rmdir()


def test_check_passes_on_this_machine():
    result = subprocess.run([str(AGENT_BIN), "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines][:3] == ["kernel", "BTF", "memlock"]
    assert all(" ok " in line or " warn " in line for line in lines), result.stdout
    assert any(line.startswith("eBPF programs") and "attached" in line for line in lines)
    # Debian's OpenSSL 3 is probed where the kernel emulates the instruction (no trap per call).
    libssl = [line for line in lines if line.startswith("TLS probes") and "libssl.so.3" in line]
    assert libssl and "emulated" in libssl[0] and "single-stepped" not in libssl[0], result.stdout


def test_config_print_merges_flag_env_and_file(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("port: [8080]\ntopic: from-file\nservice-version: from-file\napi-key: from-file\n")
    result = subprocess.run(
        [str(AGENT_BIN), "--config", str(config), "--service-version", "from-flag", "config", "--print"],
        capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "APITOOLKIT_TOPIC": "from-env"},
    )
    printed = result.stdout
    assert 'service-version = "from-flag"' in printed
    assert 'topic = "from-env"' in printed
    assert "port = [8080]" in printed
    assert 'api-key = "****"' in printed


def metric(text, name):
    """The value of an unlabelled (or exactly labelled) sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_metrics_healthz_and_json_logs(flask_server):
    import json
    import time

    port = free_port()
    agent = Agent([flask_server.pid], "--metrics-address", f"127.0.0.1:{port}", "--log-format", "json")
    try:
        for i in range(3):
            assert requests.get(f"{flask_server.base}/item/{i}").status_code == 200
        assert len(agent.wait_for(3)) == 3
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = requests.get(f"{endpoint}/metrics").text
            if metric(text, "apitoolkit_agent_exchanges_total") == 3:
                break
            time.sleep(0.2)
        assert metric(text, "apitoolkit_agent_exchanges_total") == 3, text
        name = Path(f"/proc/{flask_server.pid}/comm").read_text().strip()
        assert metric(text, f'apitoolkit_agent_payloads_total{{pid="{flask_server.pid}",process="{name}"}}') == 3
        assert metric(text, 'apitoolkit_agent_dropped_events_total{cause="ringbuf_full"}') == 0
        assert metric(text, "apitoolkit_agent_watched_processes") == 1
        # Counters once only in the shutdown log are exported too.
        assert metric(text, "apitoolkit_agent_not_http_connections_total") == 0, text
        assert metric(text, "apitoolkit_agent_errors_unattached_total") == 0, text
        health = requests.get(f"{endpoint}/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")
    finally:
        assert agent.stop() == 0
    records = [json.loads(line) for line in agent.log]
    assert any(r["fields"]["message"] == "capture stopped" and r["fields"]["exchanges"] == 3 for r in records)


def test_kubernetes_selectors_outside_kubernetes_are_a_clear_error():
    result = subprocess.run([str(AGENT_BIN), "--k8s-namespace", "shop"], capture_output=True, text=True,
                            timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "--k8s-namespace and --k8s-label need the agent to run in a Kubernetes pod" in result.stderr
