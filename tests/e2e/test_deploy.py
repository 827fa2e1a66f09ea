"""The deployment files in config/ are valid: Kubernetes manifests against the API schemas
(offline), the systemd unit with systemd-analyze, the example config with the agent itself."""
import shutil
import subprocess

import pytest

from conftest import AGENT_BIN, ROOT

CONFIG = ROOT / "config"


def test_kubernetes_manifests_validate_against_the_schemas():
    manifests = sorted((CONFIG / "kubernetes").glob("*.yaml"))
    assert manifests
    result = subprocess.run(["kubernetes-validate", "--strict", *map(str, manifests)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "daemonset/apitoolkit-agent" in result.stdout + result.stderr


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "apitoolkit-agent.service"
    # verify checks that ExecStart exists: point it at the binary under test.
    unit.write_text((CONFIG / "apitoolkit-agent.service").read_text()
                    .replace("/usr/local/bin/apitoolkit-agent", str(AGENT_BIN)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_example_config_is_accepted():
    result = subprocess.run([str(AGENT_BIN), "--config", str(CONFIG / "agent.toml"), "config", "--print"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "port = [8080]" in result.stdout
    assert 'redact-header = ["Authorization", "Cookie", "Set-Cookie"]' in result.stdout
