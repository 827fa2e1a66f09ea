"""The agent as a drop-in for the SDK: API-key bootstrap, real Pub/Sub emulator, redaction."""
import subprocess
import time
import uuid

import pytest
import requests

from conftest import AGENT_BIN, PROJECT_ID, MetadataStub, body, body_json, header

REDACTED = "[CLIENT_REDACTED]"


@pytest.fixture
def topic(pubsub_emulator):
    name = f"topic-{uuid.uuid4().hex[:8]}"
    return name, pubsub_emulator.create_topic(name)


@pytest.fixture
def metadata_stub(topic):
    stub = MetadataStub(topic[0])
    yield stub
    stub.stop()


def test_api_key_bootstrap_publishes_redacted_payloads(flask_server, agent_factory, pubsub_emulator, topic, metadata_stub):
    _, subscription = topic
    agent = agent_factory(
        [flask_server.pid],
        "--api-key", MetadataStub.API_KEY, "--root-url", metadata_stub.url,
        "--tag", "env:test", "--tag", "team:core", "--service-version", "1.4.2",
        "--redact-header", "authorization", "--redact-header", "X-API-KEY",
        "--redact-request-body", "$.user.password",
        "--redact-request-body", "$.items[*].secret",
        "--redact-response-body", "$..password",
        "--redact-response-body", "$..secret",
        "--debug",
        env={"PUBSUB_EMULATOR_HOST": pubsub_emulator.host},
    )
    secret = "s3cret-value"
    sent = {
        "user": {"name": "bob", "password": secret, "пароль": "keep"},
        "items": [{"secret": secret, "id": 1}, {"secret": secret, "id": 2}],
        "note": "kept",
    }
    requests.post(f"{flask_server.base}/echo", json=sent,
                  headers={"Authorization": f"Bearer {secret}", "X-Api-Key": secret, "X-Other": "visible"})
    requests.get(f"{flask_server.base}/hello?name=alice")
    # Declared JSON that does not parse: under body rules it is withheld, never sent as captured.
    requests.post(f"{flask_server.base}/upload", data=b"not json " + secret.encode(),
                  headers={"Content-Type": "application/json"})

    messages = pubsub_emulator.pull(subscription, expected=3)
    assert len(messages) == 3
    assert agent.wait_for(0, timeout=0) == [], "with a destination, stdout stays empty"
    assert metadata_stub.requests == [("/api/client_metadata", f"Bearer {MetadataStub.API_KEY}")]
    by_url = {m["raw_url"]: m for m in messages}

    for message in messages:
        assert message["project_id"] == PROJECT_ID
        assert message["sdk_type"] == "PythonFlask"
        assert message["service_version"] == "1.4.2"
        assert message["tags"][:2] == ["env:test", "team:core"]
        assert secret not in str(message)
        assert secret.encode() not in body(message, "request_body") + body(message, "response_body")

    echo = by_url["/echo"]
    assert header(echo, "request_headers", "Authorization") == [REDACTED]
    assert header(echo, "request_headers", "X-Api-Key") == [REDACTED]
    assert header(echo, "request_headers", "X-Other") == ["visible"]
    assert body_json(echo, "request_body") == {
        "user": {"name": "bob", "password": REDACTED, "пароль": "keep"},
        "items": [{"secret": REDACTED, "id": 1}, {"secret": REDACTED, "id": 2}],
        "note": "kept",
    }
    assert body_json(echo, "response_body")["received"] == {
        "user": {"name": "bob", "password": REDACTED, "пароль": "keep"},
        "items": [{"secret": REDACTED, "id": 1}, {"secret": REDACTED, "id": 2}],
        "note": "kept",
    }

    upload = by_url["/upload"]
    assert upload["request_body"] == ""
    assert "apitoolkit.request_body_withheld" in upload["tags"]
    assert body_json(by_url["/hello?name=alice"], "response_body")["args"] == {"name": ["alice"]}
    # --debug names each published payload, and logs none of its content (only stdout shows it).
    assert sum("publishing msg_id=" in line for line in agent.log) == 3
    assert not any("X-Other" in line or "alice" in line for line in agent.log)


def test_api_key_gives_stdout_payloads_the_fetched_project_id(flask_server, agent_factory, metadata_stub):
    agent = agent_factory(
        [flask_server.pid], "--api-key", MetadataStub.API_KEY, "--root-url", metadata_stub.url,
        "--output", "stdout",
    )
    requests.get(f"{flask_server.base}/hello?name=alice")
    payloads = agent.wait_for(1)
    assert [p["project_id"] for p in payloads] == [PROJECT_ID]
    assert metadata_stub.requests == [("/api/client_metadata", f"Bearer {MetadataStub.API_KEY}")]


def test_invalid_api_key_is_a_clean_exit(flask_server, metadata_stub):
    result = subprocess.run(
        [str(AGENT_BIN), "--pid", str(flask_server.pid), "--api-key", "wrong", "--root-url", metadata_stub.url],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("apitoolkit-agent: invalid API key")


def test_outage_keeps_payloads_within_the_bound_and_counts_the_rest(flask_server, agent_factory, interruptible_pubsub):
    pubsub = interruptible_pubsub
    # Room for about four of these small payloads: the rest of the outage is dropped, oldest first.
    agent = agent_factory(
        [flask_server.pid], "--pubsub-project", "apitoolkit-test", "--topic", pubsub.topic,
        "--project-id", PROJECT_ID, "--queue-bytes", "6000", env={"PUBSUB_EMULATOR_HOST": pubsub.host},
    )
    for i in range(3):
        requests.get(f"{flask_server.base}/item/{i}")
    assert sorted(pubsub.pull(expected=3)) == [f"/item/{i}" for i in range(3)]

    pubsub.kill()
    for i in range(10, 22):
        requests.get(f"{flask_server.base}/item/{i}")
    time.sleep(2)
    pubsub.replace()
    delivered = pubsub.pull(expected=4, timeout=60)
    assert agent.stop() == 0
    dropped = agent.stats()["sink_dropped"]
    assert dropped > 0, "12 payloads cannot fit in 6000 bytes"
    assert len(delivered) + dropped == 12
    assert len(set(delivered)) == len(delivered), "no duplicates"
    # The newest payloads survive: drop-oldest.
    assert "/item/21" in delivered


def test_a_payload_over_the_message_size_limit_is_dropped_and_the_rest_delivered(
        flask_server, agent_factory, pubsub_emulator, topic, metadata_stub):
    """A 9 MiB upload under --max-body-bytes 16 MiB makes a message of ~12 MB, over Pub/Sub's
    10 MB: it is dropped and logged (retried, it would block every payload queued after it)."""
    _, subscription = topic
    agent = agent_factory(
        [flask_server.pid],
        "--api-key", MetadataStub.API_KEY, "--root-url", metadata_stub.url,
        "--max-body-bytes", str(16 << 20),
        env={"PUBSUB_EMULATOR_HOST": pubsub_emulator.host},
    )
    requests.post(f"{flask_server.base}/upload", data=b"x" * (9 << 20),
                  headers={"Content-Type": "application/octet-stream"})
    agent.wait_for_log("over Pub/Sub's message size limit", timeout=20)
    requests.get(f"{flask_server.base}/hello?name=after")
    messages = pubsub_emulator.pull(subscription, expected=1)
    assert [m["raw_url"] for m in messages] == ["/hello?name=after"]
