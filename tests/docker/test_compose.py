"""docker/compose.yaml agrees with the Dockerfile it builds (no compose engine runs here: the
stages, paths, ports and arguments it names are checked against the Dockerfile and the code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.helpers import drain_budget_s
from unetpp.demo import repository_for

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def dockerfile() -> dict:
    """Stages (name -> their CMD as a list), declared ARGs, and EXPOSEd ports."""
    text = (DOCKER / "Dockerfile").read_text()
    stages: dict[str, list[str]] = {}
    stage = None
    for line in text.splitlines():
        if m := re.match(r"FROM \S+ AS (\S+)", line):
            stage = m[1]
            stages[stage] = []
        elif stage and line.startswith("CMD ["):
            stages[stage] = json.loads(line[len("CMD ") :])
    return {
        "stages": stages,
        "args": set(re.findall(r"^ARG (\w+)", text, re.M)),
        "expose": set(re.findall(r"^EXPOSE (\d+)", text, re.M)),
    }


def test_compose_builds_the_dockerfile_and_serves_what_the_init_service_writes() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    docker = dockerfile()
    services = compose["services"]
    assert set(compose["volumes"]) == {"models"}

    init = services["models"]
    assert init["build"]["target"] in docker["stages"]
    assert "models:/models" in init["volumes"]
    cmd = docker["stages"][init["build"]["target"]]
    cache_dir = cmd[cmd.index("--cache-dir") + 1]
    written = repository_for("synthetic", cache_dir)

    for name in ("server", "server-gpu"):
        server = services[name]
        assert docker["stages"][server["build"]["target"]] == ["unetpp", "serve"]
        assert set(server["build"].get("args", {})) <= docker["args"]
        assert "models:/models:ro" in server["volumes"]
        assert Path(server["environment"]["UNETPP_MODELS"]) == written
        assert server["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert {p.rsplit(":", 1)[1] for p in server["ports"]} <= docker["expose"]
        assert int(server["stop_grace_period"].rstrip("s")) > drain_budget_s()

    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in services["server"]
    assert gpu["build"]["args"]["EXTRA"] == "gpu" and gpu["environment"]["UNETPP_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
