"""Real processes for the end-to-end suite: the agent (real eBPF, needs root), Flask under
werkzeug and gunicorn, and helpers to read the agent's NDJSON payloads."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests" / "apps"
sys.path.insert(0, str(APPS))
from metadata_stub import PROJECT_ID, PUBSUB_PROJECT, MetadataStub  # noqa: E402,F401  (apps are not a package; tests import these from here)

AGENT_BIN = Path(os.environ.get("APITOOLKIT_AGENT_BIN", ROOT / "target" / "release" / "apitoolkit-agent"))


def pytest_collection_modifyitems(config, items):
    reason = None
    if os.geteuid() != 0:
        reason = "end-to-end tests load eBPF programs: run as root (CI does)"
    elif not AGENT_BIN.exists():
        reason = f"agent binary {AGENT_BIN} missing: run `cargo xtask test`"
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def load_across_agent_sigkill(agent, url, session_factory):
    """Four keep-alive clients (sessions from `session_factory`) GET `url` while the agent is
    SIGKILLed with its probes attached: the requests served before the kill, and every status."""
    statuses = []
    stop = threading.Event()

    def load():
        with session_factory() as session:
            while not stop.is_set():
                statuses.append(session.get(url, timeout=10).status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.5)
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(timeout=10)
        served_at_kill = len(statuses)
        time.sleep(1.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
    return served_at_kill, statuses


def wait_for_items(items: list, lock: threading.Lock, count: int, timeout: float = 20.0) -> list:
    """Waits until `items` (filled by another thread under `lock`) holds at least `count`, then a
    little longer so that extra (unexpected) ones show up too; returns a copy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            if len(items) >= count:
                break
        time.sleep(0.05)
    time.sleep(0.3)
    with lock:
        return list(items)


class Server:
    def __init__(self, argv, port: int, env=None, scheme="http", cwd=APPS):
        self.port = port
        self.base = f"{scheme}://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, "PORT": str(port), **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Agent:
    """The agent watching some pids; collects payloads from stdout and log lines from stderr."""

    def __init__(self, pids, *extra_args, env=None):
        args = [str(AGENT_BIN)]
        for pid in pids:
            args += ["--pid", str(pid)]
        args += list(extra_args)
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env={**os.environ, **(env or {})})
        self.payloads = []
        self.log = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._ready.wait(timeout=60):
            self.stop()
            raise RuntimeError("agent did not attach:\n" + "\n".join(self.log))

    def _read_stdout(self):
        for line in self.process.stdout:
            with self._lock:
                self.payloads.append(json.loads(line))

    def _read_stderr(self):
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            sys.stderr.write(f"[agent] {line}\n")
            with self._lock:
                self.log.append(line)
            if "watching processes" in line:
                self._ready.set()
        self._ready.set()

    def wait_for(self, count: int, timeout: float = 20.0):
        """Waits until at least `count` payloads arrived (see `wait_for_items`)."""
        return wait_for_items(self.payloads, self._lock, count, timeout)

    def wait_for_log(self, *fragments, timeout: float = 10.0) -> str:
        """The first log line containing every fragment, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.log:
                    if all(fragment in line for fragment in fragments):
                        return line
            time.sleep(0.05)
        raise AssertionError(f"no log line with {fragments}:\n" + "\n".join(self.log))

    def stop(self, sig=signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def stats(self) -> dict:
        """key=value fields of the final `capture stopped` log line."""
        for line in reversed(self.log):
            if "capture stopped" in line:
                fields = {}
                for token in line.split():
                    key, sep, value = token.partition("=")
                    if sep and value.isdigit():
                        fields[key] = int(value)
                return fields
        raise AssertionError("no 'capture stopped' line in the agent log")


def body(payload, field: str) -> bytes:
    return base64.b64decode(payload[field])


def body_json(payload, field: str):
    return json.loads(body(payload, field))


def header(payload, field: str, name: str):
    """Values of a header, matched case-insensitively."""
    for key, values in payload[field].items():
        if key.lower() == name.lower():
            return values
    return None


@pytest.fixture
def flask_server():
    port = free_port()
    server = Server([sys.executable, str(APPS / "flask_app.py")], port)
    yield server
    server.stop()


def start_gunicorn(*worker_args, scheme="http", env=None) -> Server:
    port = free_port()
    return Server(
        [sys.executable, "-m", "gunicorn", *worker_args, "--bind", f"127.0.0.1:{port}", "flask_app:app"],
        port,
        env=env,
        scheme=scheme,
    )


@pytest.fixture(params=["werkzeug", "gunicorn"])
def any_flask_server(request):
    """The same Flask app under werkzeug's threaded dev server and under 2 gunicorn workers."""
    if request.param == "werkzeug":
        port = free_port()
        server = Server([sys.executable, str(APPS / "flask_app.py")], port)
    else:
        server = start_gunicorn("--workers", "2")
    yield server
    server.stop()


@pytest.fixture
def gunicorn_server():
    server = start_gunicorn("--workers", "2")
    yield server
    server.stop()


@pytest.fixture
def gthread_server():
    """gunicorn's threaded worker keeps connections alive (werkzeug's dev server closes them)."""
    server = start_gunicorn("--worker-class", "gthread", "--threads", "4", "--keep-alive", "30")
    yield server
    server.stop()


@pytest.fixture
def node_server():
    port = free_port()
    server = Server(["node", str(APPS / "node_server.js")], port)
    yield server
    server.stop()


class Certificate:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""

    def __init__(self, directory: Path):
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )

    @property
    def env(self):
        return {"TLS_CERT": str(self.cert), "TLS_KEY": str(self.key), "UPSTREAM_CA": str(self.cert)}


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    return Certificate(tmp_path_factory.mktemp("tls"))


def start_https_gthread(certificate) -> Server:
    return start_gunicorn("--worker-class", "gthread", "--threads", "4", "--keep-alive", "30",
                          "--certfile", str(certificate.cert), "--keyfile", str(certificate.key),
                          scheme="https", env=certificate.env)


@pytest.fixture(params=["werkzeug", "gunicorn"])
def https_flask_server(request, certificate):
    """Flask over HTTPS: werkzeug's ssl_context, and gunicorn gthread with --certfile."""
    if request.param == "werkzeug":
        port = free_port()
        server = Server([sys.executable, str(APPS / "flask_app.py")], port, env=certificate.env, scheme="https")
    else:
        server = start_https_gthread(certificate)
    yield server
    server.stop()


@pytest.fixture
def https_gthread_server(certificate):
    server = start_https_gthread(certificate)
    yield server
    server.stop()


@pytest.fixture
def https_node_server(certificate):
    port = free_port()
    server = Server(["node", str(APPS / "node_server.js")], port, env=certificate.env, scheme="https")
    yield server
    server.stop()


@pytest.fixture
def agent_factory():
    agents = []

    def start(pids, *extra_args, env=None):
        agent = Agent(pids, *extra_args, env=env)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")


class PubSubEmulator:
    """The real Pub/Sub emulator, driven through its REST API."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.host}/v1/projects/{PUBSUB_PROJECT}"
        self.process = subprocess.Popen(
            [str(EMULATOR), "--host=127.0.0.1", f"--port={self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for_port(self.port, self.process, timeout=60)

    def create_topic(self, topic: str) -> str:
        import requests
        requests.put(f"{self.base}/topics/{topic}", timeout=10).raise_for_status()
        subscription = f"{topic}-sub"
        requests.put(
            f"{self.base}/subscriptions/{subscription}",
            json={"topic": f"projects/{PUBSUB_PROJECT}/topics/{topic}"}, timeout=10,
        ).raise_for_status()
        return subscription

    def pull(self, subscription: str, expected: int, timeout: float = 30.0):
        """Pulls and acks until `expected` messages arrived (or the timeout), then once more to
        catch extras; returns the decoded payloads."""
        import requests
        payloads = []
        deadline = time.monotonic() + timeout
        extra_round = False
        while time.monotonic() < deadline:
            response = requests.post(f"{self.base}/subscriptions/{subscription}:pull",
                                     json={"maxMessages": 100, "returnImmediately": True}, timeout=30)
            response.raise_for_status()
            received = response.json().get("receivedMessages", [])
            if received:
                requests.post(f"{self.base}/subscriptions/{subscription}:acknowledge",
                              json={"ackIds": [m["ackId"] for m in received]}, timeout=10).raise_for_status()
                payloads += [json.loads(base64.b64decode(m["message"]["data"])) for m in received]
            elif len(payloads) >= expected:
                if extra_round:
                    break
                extra_round = True
            time.sleep(0.2)
        return payloads

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="session")
def pubsub_emulator():
    emulator = PubSubEmulator()
    yield emulator
    emulator.stop()


class Relay:
    """A TCP forwarder on a fixed port in front of a server that may die and come back on
    another port. While cut, the port refuses connections, as a dead server's would; the
    server's replacement is only reachable once `restore` is called, after it is set up."""

    def __init__(self, upstream_port: int):
        self.port = free_port()
        self.upstream_port = upstream_port
        self.connections = []
        self.lock = threading.Lock()
        self.listener = None
        self.restore(upstream_port)

    def restore(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self):
        self.listener.close()
        with self.lock:
            for sock in self.connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.connections.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class InterruptiblePubSub:
    """A Pub/Sub emulator the agent reaches through a Relay, so a test can kill it and bring up
    a fresh one (topic and subscription created before the agent can reach it: nothing the
    agent publishes can fall between the two)."""

    def __init__(self, topic: str):
        self.topic = topic
        self.emulator = PubSubEmulator()
        self.subscription = self.emulator.create_topic(topic)
        self.relay = Relay(self.emulator.port)
        self.host = f"127.0.0.1:{self.relay.port}"

    def kill(self):
        self.emulator.stop()
        self.relay.cut()

    def replace(self):
        self.emulator = PubSubEmulator()
        self.subscription = self.emulator.create_topic(self.topic)
        self.relay.restore(self.emulator.port)

    def pull(self, expected: int, timeout: float = 30.0):
        return [m["raw_url"] for m in self.emulator.pull(self.subscription, expected, timeout)]

    def stop(self):
        self.relay.cut()
        self.emulator.stop()


@pytest.fixture
def interruptible_pubsub():
    pubsub = InterruptiblePubSub("outage")
    yield pubsub
    pubsub.stop()
