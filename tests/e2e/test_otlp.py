"""OTLP export: the agent's spans at a real OTLP receiver (gRPC and HTTP/protobuf, decoded with
the official OpenTelemetry protobuf definitions), from a real Flask app under real eBPF:
attributes, redaction, parent/child spans, W3C traceparent, an outage, a rejected key."""
import base64
import signal
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import free_port, wait_for_items
from otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, OtlpReceiver

REDACTED = "[CLIENT_REDACTED]"
API_KEY = "otlp-test-key"
# A caller's trace context, and the one the service sends on with an outgoing call.
CALLER = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
PROPAGATED = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")


def traceparent(ids):
    return f"00-{ids[0]}-{ids[1]}-01"


@pytest.fixture(params=["grpc", "http"])
def receiver(request):
    receiver = OtlpReceiver(request.param, free_port(), api_key=API_KEY)
    yield receiver
    receiver.stop()


def otlp_args(receiver, *extra):
    return ("--output", "otlp", "--otlp-endpoint", receiver.endpoint, "--otlp-protocol", receiver.protocol,
            *extra)


def by_target(spans):
    found = {}
    for span in spans:
        found.setdefault(span["attributes"]["http.target"], []).append(span)
    return found


def decoded(span, field):
    return base64.b64decode(span["attributes"][field])


def test_spans_carry_the_sdk_attributes_redacted_and_join_traces(receiver, flask_server, node_server, agent_factory):
    agent = agent_factory(
        [flask_server.pid], *otlp_args(receiver, "--otlp-header", "X-Tenant=blue"),
        "--api-key", API_KEY, "--service-version", "1.4.2", "--tag", "env:test",
        "--redact-header", "authorization", "--redact-request-body", "$.user.password",
        "--redact-response-body", "$..password",
    )
    secret = "s3cret-value"
    sent = {"user": {"name": "bob", "password": secret}, "note": "kept"}
    requests.post(f"{flask_server.base}/echo?page=2", json=sent,
                  headers={"Authorization": f"Bearer {secret}", "X-Other": "visible"})
    requests.get(f"{flask_server.base}/hello?name=alice", headers={"traceparent": traceparent(CALLER)})
    requests.get(f"{flask_server.base}/item/7", headers={"traceparent": "00-not-a-valid-context-01"})
    requests.get(f"{flask_server.base}/proxy", params={"url": f"{node_server.base}/up/1"})
    requests.get(f"{flask_server.base}/proxy",
                 params={"url": f"{node_server.base}/up/2", "traceparent": traceparent(PROPAGATED)})

    spans = wait_for_items(receiver.spans, receiver.lock, 7)
    assert len(spans) == 7, [span["attributes"]["http.target"] for span in spans]
    assert agent.wait_for(0, timeout=0) == [], "--output otlp alone writes nothing to stdout"
    assert all(headers.get("x-api-key") == API_KEY and headers.get("x-tenant") == "blue"
               for headers in receiver.headers)
    assert secret not in json.dumps(spans)
    assert all(secret.encode() not in decoded(span, "http.request.body") + decoded(span, "http.response.body")
               for span in spans)
    targets = by_target(spans)

    [echo] = targets["/echo?page=2"]
    attributes = echo["attributes"]
    assert echo["name"] == "monoscope.http"
    assert echo["kind"] == SPAN_KIND_SERVER
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == attributes["url.path"] == "/echo"
    assert attributes["net.host.name"] == f"127.0.0.1:{flask_server.port}"
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["network.protocol.version"] == "1.1"
    assert json.loads(attributes["http.request.query_params"]) == {"page": ["2"]}
    assert json.loads(attributes["http.request.path_params"]) == {}
    assert json.loads(decoded(echo, "http.request.body")) == {"user": {"name": "bob", "password": REDACTED},
                                                              "note": "kept"}
    assert json.loads(decoded(echo, "http.response.body"))["received"]["user"]["password"] == REDACTED
    assert attributes["http.request.header.authorization"] == [REDACTED]
    assert attributes["http.request.header.x-other"] == ["visible"]
    assert attributes["http.response.header.content-type"] == ["application/json"]
    assert attributes["apitoolkit.sdk_type"] == "PythonFlask"
    assert attributes["apitoolkit.errors"] == "[]"
    assert attributes["apitoolkit.tags"][0] == "env:test"
    assert attributes["apitoolkit.service_version"] == "1.4.2"
    msg_id = uuid.UUID(attributes["apitoolkit.msg_id"])
    assert echo["trace_id"] == msg_id.hex, "a request without traceparent starts its own trace"
    assert echo["parent_span_id"] == ""
    assert 0 < echo["end"] - echo["start"] < 10**10
    assert abs(echo["end"] / 1e9 - time.time()) < 60
    resource = echo["resource"]
    assert resource["service.name"] == Path(f"/proc/{flask_server.pid}/comm").read_text().strip()
    assert resource["service.version"] == "1.4.2"
    assert resource["host.name"]
    assert "at-project-key" not in resource, "the key joins the resource only for APIToolkit's collector"

    [joined] = targets["/hello?name=alice"]
    assert (joined["trace_id"], joined["parent_span_id"]) == CALLER
    [malformed] = targets["/item/7"]
    assert malformed["trace_id"] == uuid.UUID(malformed["attributes"]["apitoolkit.msg_id"]).hex
    assert malformed["parent_span_id"] == ""

    incoming = {span["attributes"]["http.target"]: span for span in spans if span["kind"] == SPAN_KIND_SERVER}
    outgoing = {span["attributes"]["http.target"]: span for span in spans if span["kind"] == SPAN_KIND_CLIENT}
    assert sorted(outgoing) == ["/up/1", "/up/2"]
    child = outgoing["/up/1"]
    parent = incoming[f"/proxy?url=http%3A%2F%2F127.0.0.1%3A{node_server.port}%2Fup%2F1"]
    assert child["attributes"]["apitoolkit.sdk_type"] == "PythonOutgoing"
    assert child["attributes"]["apitoolkit.parent_id"] == parent["attributes"]["apitoolkit.msg_id"]
    assert child["trace_id"] == parent["trace_id"]
    assert child["parent_span_id"] == parent["span_id"]
    assert child["attributes"]["net.host.name"] == f"127.0.0.1:{node_server.port}"
    # The service sent a traceparent on: its call sits under the span that header names.
    assert (outgoing["/up/2"]["trace_id"], outgoing["/up/2"]["parent_span_id"]) == PROPAGATED
    assert len({span["span_id"] for span in spans}) == 7


def test_outage_delivers_what_the_queue_holds_once_and_counts_the_rest(receiver, flask_server, agent_factory):
    """The receiver is down for 30 s under traffic: what fits in the queue is delivered once
    when it is back (the newest: drop-oldest), the rest is dropped and counted."""
    agent = agent_factory([flask_server.pid], *otlp_args(receiver), "--api-key", API_KEY,
                          "--queue-bytes", "60000")
    with requests.Session() as session:
        for i in range(3):
            session.get(f"{flask_server.base}/item/{i}")
        assert len(wait_for_items(receiver.spans, receiver.lock, 3)) == 3

        receiver.stop()
        sent = []
        outage_end = time.monotonic() + 30
        while time.monotonic() < outage_end:
            sent.append(f"/item/{1000 + len(sent)}")
            session.get(f"{flask_server.base}{sent[-1]}")
            time.sleep(0.05)
        agent.wait_for_log("delivery failed", "otlp", timeout=1)
        receiver.start()

    agent.wait_for_log("delivering again", "otlp", timeout=30)
    delivered = [span["attributes"]["http.target"] for span in receiver.wait_until_quiet()[3:]]
    assert agent.stop() == 0
    dropped = agent.stats()["sink_dropped"]
    assert len(sent) > 200
    assert dropped > 0, f"{len(sent)} payloads cannot fit in 60000 bytes"
    assert len(set(delivered)) == len(delivered), "nothing delivered twice"
    assert len(delivered) + dropped == len(sent)
    assert set(delivered) == set(sent[-len(delivered):]), "the oldest are the ones dropped"


def test_a_rejected_api_key_is_logged_once_and_not_retried_at_full_speed(receiver, flask_server, agent_factory):
    metrics = f"127.0.0.1:{free_port()}"
    agent = agent_factory([flask_server.pid], *otlp_args(receiver), "--api-key", "wrong-key",
                          "--metrics-address", metrics)
    with requests.Session() as session:
        for i in range(40):
            session.get(f"{flask_server.base}/item/{i}")
            time.sleep(0.1)
    line = agent.wait_for_log("rejected the API key", timeout=10)
    assert "otlp" in line and receiver.endpoint in line
    time.sleep(1)
    assert receiver.spans == []
    assert receiver.rejected == 1, "one attempt, then a long pause"
    assert sum("rejected the API key" in line for line in agent.log) == 1
    counted = [line for line in requests.get(f"http://{metrics}/metrics", timeout=5).text.splitlines()
               if line.startswith("apitoolkit_agent_sink_failures_total{")]
    assert counted == ['apitoolkit_agent_sink_failures_total{sink="otlp",reason="rejected"} 1'], counted
    assert agent.stop() == 0


@pytest.fixture(scope="module")
def server_certificate(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 it signed (rustls refuses a self-signed CA
    certificate as the server's own); returns (ca.pem, cert.pem, key.pem)."""
    directory = tmp_path_factory.mktemp("otlp-tls")
    ca, ca_key, cert, key, csr, extensions = (str(directory / name) for name in
                                              ("ca.pem", "ca-key.pem", "cert.pem", "key.pem", "cert.csr", "ext.cnf"))
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                       "extendedKeyUsage=serverAuth\n")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=OTLP test CA",
            "-keyout", ca_key, "-out", ca)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
            "-extfile", extensions, "-out", cert)
    return ca, cert, key


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_https_endpoint_is_verified_with_the_system_roots(protocol, server_certificate, flask_server,
                                                             agent_factory):
    ca, cert, key = server_certificate
    receiver = OtlpReceiver(protocol, free_port(), certificate=(cert, key))
    try:
        # Its CA is not among the system roots: nothing is sent.
        untrusting = agent_factory([flask_server.pid], *otlp_args(receiver))
        requests.get(f"{flask_server.base}/item/1")
        untrusting.wait_for_log("delivery failed", "otlp", timeout=10)
        untrusting.process.kill()
        untrusting.process.wait()
        assert receiver.spans == []
        # The system roots (SSL_CERT_FILE) hold its CA: delivered.
        agent_factory([flask_server.pid], *otlp_args(receiver), env={"SSL_CERT_FILE": ca})
        requests.get(f"{flask_server.base}/item/2")
        spans = wait_for_items(receiver.spans, receiver.lock, 1)
        assert [span["attributes"]["http.target"] for span in spans] == ["/item/2"]
    finally:
        receiver.stop()


def test_a_redacted_traceparent_names_no_trace(flask_server, node_server, agent_factory):
    """--redact-header traceparent: the spans do not carry the trace the hidden header named,
    neither the request's nor its outgoing call's."""
    receiver = OtlpReceiver("grpc", free_port())
    try:
        agent_factory([flask_server.pid], *otlp_args(receiver), "--redact-header", "traceparent")
        requests.get(f"{flask_server.base}/proxy", params={"url": f"{node_server.base}/up/1"},
                     headers={"traceparent": traceparent(CALLER)})
        spans = wait_for_items(receiver.spans, receiver.lock, 2)
    finally:
        receiver.stop()
    assert len(spans) == 2
    assert CALLER[0] not in json.dumps(spans) and CALLER[1] not in json.dumps(spans)
    incoming = next(span for span in spans if span["kind"] == SPAN_KIND_SERVER)
    outgoing = next(span for span in spans if span["kind"] == SPAN_KIND_CLIENT)
    assert incoming["attributes"]["http.request.header.traceparent"] == [REDACTED]
    assert incoming["trace_id"] == uuid.UUID(incoming["attributes"]["apitoolkit.msg_id"]).hex
    assert incoming["parent_span_id"] == ""
    assert (outgoing["trace_id"], outgoing["parent_span_id"]) == (incoming["trace_id"], incoming["span_id"])


def test_sigterm_flushes_what_is_queued(flask_server, agent_factory):
    receiver = OtlpReceiver("grpc", free_port())
    try:
        agent = agent_factory([flask_server.pid], *otlp_args(receiver))
        with requests.Session() as session:
            for i in range(30):
                session.get(f"{flask_server.base}/item/{i}")
        assert agent.stop(signal.SIGTERM) == 0
        # Delivered before the agent exited, not after.
        delivered = sorted(span["attributes"]["http.target"] for span in receiver.spans)
    finally:
        receiver.stop()
    assert delivered == sorted(f"/item/{i}" for i in range(30))
    assert agent.wait_for_log("sink stopped", "otlp", "delivered=30", timeout=2)
