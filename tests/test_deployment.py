"""Dockerfile, docker-compose.yml and nginx.conf, checked without a Docker engine.

No engine runs where the tests run, so the files are read as text and YAML:
every path they name must exist (and survive .dockerignore), every stage and
target they name must be defined, the runtime images must install only the
service's dependencies (no TensorFlow), and nginx must point at the alias and
port the replicas serve on.
"""

from __future__ import annotations

import fnmatch
import glob
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
NGINX = REPO / "deploy" / "nginx.conf"
#: Packages of the training side that must never reach a serving image.
TRAINING_ONLY = ("tensorflow", "keras", "tf2onnx", "lenstronomy", "tf_keras")
#: The image targets and the devices they default to.
RUNTIME_TARGETS = {"cpu": "cpu", "gpu": "cuda"}
SERVICE_PORT = 8000


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    pairs = []
    for entry in logical:
        keyword, _, arguments = entry.partition(" ")
        pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def _stages() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, arguments in _instructions(DOCKERFILE.read_text()):
        if keyword == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arguments, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {arguments}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stages.append(Stage(match.group(2), base))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, arguments))
    return args, stages


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(relative: str) -> bool:
    """Whether .dockerignore drops a path (its own pattern or one of its folders')."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in _dockerignore_patterns():
        bare = pattern.removeprefix("**/")
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or fnmatch.fnmatch(Path(candidate).name, bare):
                return True
    return False


def _copy_sources(arguments: str) -> list[str]:
    words = [w for w in shlex.split(arguments) if not w.startswith("--")]
    return words[:-1]


def test_every_stage_is_named_and_cpu_is_the_default_target():
    _, stages = _stages()
    names = [stage.name for stage in stages]
    assert len(set(names)) == len(names)
    assert set(RUNTIME_TARGETS) <= set(names)
    assert names[-1] == "cpu"  # `docker build .` builds the last stage


def test_every_file_the_dockerfile_copies_exists_and_reaches_the_build_context():
    _, stages = _stages()
    earlier: set[str] = set()
    for stage in stages:
        for keyword, arguments in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            source_stage = re.search(r"--from=(\S+)", arguments)
            if source_stage:
                assert source_stage.group(1) in earlier, f"{stage.name}: {arguments}"
                continue
            copied = []
            for source in _copy_sources(arguments):
                matches = sorted(REPO.glob(source))
                # A wildcard may match nothing (an optional file); a plain path must exist.
                assert matches or glob.has_magic(source), f"{stage.name}: COPY {source} missing"
                copied += matches
            assert copied, f"{stage.name}: COPY {arguments} copies nothing"
            for match in copied:
                relative = match.relative_to(REPO).as_posix()
                assert not _ignored(relative), f"{relative} is excluded by .dockerignore"
        earlier.add(stage.name)


def test_the_images_get_every_model_and_card_the_service_loads():
    _, stages = _stages()
    sources = [
        source
        for stage in stages
        for keyword, arguments in stage.instructions
        if keyword == "COPY" and "--from" not in arguments
        for source in _copy_sources(arguments)
    ]
    names = {path.name for source in sources for path in REPO.glob(source)}
    for name in ("lens_classifier", "einstein_radius", "einstein_radius_mc"):
        assert {f"{name}.onnx", f"{name}.json"} <= names


def test_the_images_leave_out_what_serving_does_not_need():
    for heavy in ("data", "runs", ".venv", "training", "tests", "models/x.keras", ".git"):
        assert _ignored(heavy), heavy


def test_the_runtime_images_install_no_training_dependency():
    _, stages = _stages()
    runs = [args for stage in stages for keyword, args in stage.instructions if keyword == "RUN"]
    installs = [args for args in runs if "pip install" in args]
    assert installs, "the Dockerfile installs the service with pip"
    extras: set[str] = set()
    for command in installs:
        assert not any(name in command.lower() for name in TRAINING_ONLY), command
        for found in re.findall(r"'\.\[([^\]]*)\]'|\s\.\[([^\]]*)\]|\s\.(?:\s|$)", command):
            extras.update(e for group in found for e in group.split(",") if e)
    assert extras <= {"gpu"}, f"the images install extras {extras}"
    # What those installs resolve to: the core dependencies and the gpu extra only.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["gpu"]
    for requirement in requirements:
        assert not any(requirement.lower().startswith(n) for n in TRAINING_ONLY), requirement


def test_the_runtime_images_run_unprivileged_with_a_readiness_healthcheck():
    _, stages = _stages()
    for target, device in RUNTIME_TARGETS.items():
        (stage,) = [s for s in stages if s.name == target]
        keywords = dict(stage.instructions)
        assert keywords["USER"] not in ("root", "0")
        assert "/health/ready" in keywords["HEALTHCHECK"]
        assert f"LENSSERVE_DEVICE={device}" in keywords["ENV"]
        assert "LENSSERVE_MODELS_DIR=/app/models" in keywords["ENV"]
        assert f'--port", "{SERVICE_PORT}"' in keywords["CMD"]
    (gpu,) = [s for s in stages if s.name == "gpu"]
    assert gpu.base.startswith("nvidia/cuda:") and "runtime" in gpu.base


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_compose_file_references_only_existing_files_and_stages():
    _, stages = _stages()
    names = {stage.name for stage in stages}
    services = _compose()["services"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (REPO / build["context"]).is_dir(), name
            assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
            assert build["target"] in names, f"{name}: target {build['target']}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source}"
        for env_file in service.get("env_file", []):
            assert (REPO / env_file).is_file(), f"{name}: {env_file}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}"


def test_the_services_check_readiness_and_the_gpu_profile_reserves_a_gpu():
    services = _compose()["services"]
    for name in ("lensserve", "lensserve-gpu"):
        assert "/health/ready" in " ".join(services[name]["healthcheck"]["test"])
        assert str(SERVICE_PORT) in services[name]["expose"]
    assert "profiles" not in services["lensserve"]  # CPU is the default
    gpu = services["lensserve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "replicas" in services["lensserve"]["deploy"]


def test_docker_waits_for_the_drain_before_killing_a_replica():
    from service.settings import Settings

    defaults = Settings()
    drain_s = defaults.shutdown_grace_s + defaults.drain_timeout_s
    for name in ("lensserve", "lensserve-gpu"):
        grace = _compose()["services"][name]["stop_grace_period"]
        assert re.fullmatch(r"\d+s", grace), grace
        assert int(grace[:-1]) > drain_s


def test_nginx_balances_over_the_alias_every_replica_joins():
    services = _compose()["services"]
    aliases = {
        alias
        for name in ("lensserve", "lensserve-gpu")
        for alias in services[name]["networks"]["default"]["aliases"]
    }
    conf = NGINX.read_text()
    (server,) = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\s+resolve;", conf, flags=re.MULTILINE)
    assert server == ("lensserve-backend", str(SERVICE_PORT)) and server[0] in aliases
    assert re.search(r"proxy_pass\s+http://lensserve;", conf)
    (listen,) = re.findall(r"listen\s+(\d+);", conf)
    assert any(port.endswith(f":{listen}") for port in services["nginx"]["ports"])
    # The proxy must not refuse bodies the service accepts (32 MiB by default).
    (size,) = re.findall(r"client_max_body_size\s+(\d+)m;", conf)
    assert int(size) >= 32
    assert conf.count("{") == conf.count("}")
