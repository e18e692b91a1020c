"""docker/compose.yaml and Dockerfile: structure always, `docker compose config` when present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_compose_has_scheduler_workers_jupyter_and_s3():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = spec["services"]
    assert {"scheduler", "worker", "jupyter", "minio"} <= set(services)
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert "tcp://scheduler:8786" in services["worker"]["command"]
    env = services["worker"]["environment"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "VOXLAKE_SECRET" in env  # required, never defaulted
    for name in ("scheduler", "jupyter", "minio"):
        for port in services[name].get("ports", []):
            assert port.startswith("127.0.0.1:"), "publish on loopback only"


def test_dockerfile_pins_torch_before_installing_voxlake():
    text = (DOCKER / "Dockerfile").read_text()
    torch_at, voxlake_at = text.index("TORCH_SPEC}"), text.index('".[train,jpeg,s3,pacs,fast]"')
    assert torch_at < voxlake_at


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_validates(monkeypatch):
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker CLI has no compose plugin")
    monkeypatch.setenv("VOXLAKE_SECRET", "compose-test")
    result = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
