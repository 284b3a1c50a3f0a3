"""The deploy files (deploy/): they parse, and name only commands and settings that exist.

There is no Docker engine or Kubernetes cluster here, so these tests check what can be
checked without one: every YAML file parses; every `sprbot ...` command that docker compose,
Kubernetes, systemd and the Dockerfile run is a real command of the CLI; every SPRBOT_*
variable that the deploy files and docs/DEPLOY.md name is a real setting; KEDA scales the
inference Deployment on the bus's own stream and group; workers get whole, exclusive cores;
containers run as non-root; and systemd accepts the units (`systemd-analyze verify`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
import yaml

from bot.bus import REQUEST_GROUP, REQUESTS
from bot.cli import app
from bot.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
SPRBOT_IMAGE = "sprbot"  # the image name the manifests use; kustomize rewrites it


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def _k8s_objects() -> list[dict]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def _k8s(kind: str, name: str) -> dict:
    found = [o for o in _k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}: keys repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not Key=value"
        current.append((key.strip(), value.strip()))
    return sections


def _values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


# -- which commands the deploy files run ---------------------------------------------------------


def _compose_commands() -> dict[str, list[str]]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {
        f"compose {name}": service["command"]
        for name, service in services.items()
        if service.get("build", {}).get("target") == "sprbot"
    }


def _k8s_commands() -> dict[str, list[str]]:
    commands = {}
    for obj in _k8s_objects():
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in _containers(obj):
            if container["image"] == SPRBOT_IMAGE:
                assert "command" not in container, "the image's entrypoint is sprbot"
                commands[f"kubernetes {obj['metadata']['name']}"] = container["args"]
    return commands


def _systemd_commands() -> dict[str, list[str]]:
    commands = {}
    for path in sorted(SYSTEMD.glob("*.service")):
        [exec_start] = _values(_unit(path), "Service", "ExecStart")
        words = exec_start.split()
        [at] = [i for i, word in enumerate(words) if word.endswith("/bin/sprbot")]
        commands[f"systemd {path.name}"] = words[at + 1 :]
    return commands


def _dockerfile_command() -> dict[str, list[str]]:
    stage = _dockerfile_stages()[-1]  # the default target
    assert stage["ENTRYPOINT"] == '["sprbot"]'
    return {"Dockerfile CMD": yaml.safe_load(stage["CMD"])}


def _dockerfile_stages() -> list[dict[str, str]]:
    """Each stage's last value of each instruction (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction == "FROM":
            stages.append({"FROM": rest})
        elif stages:
            stages[-1][instruction] = rest.strip()
    return stages


def _resolve(args: list[str]):
    """The CLI command that ``sprbot *args`` runs; fails unless every word and option exists."""
    command = typer.main.get_command(app)
    words = list(args)
    while words and _is_group(command) and not words[0].startswith("-"):
        name = words.pop(0)
        assert name in command.commands, f"`sprbot ... {name}` is not a command"
        command = command.commands[name]
    options = {opt for param in command.params for opt in param.opts} | {"--help", "-h"}
    for word in words:
        assert word.split("=")[0] in options, f"{word!r} is not an option of {command.name}"
    assert words == ["--help"] or not _is_group(command), (
        f"`sprbot {' '.join(args)}` names a group, not a command"
    )
    return command


def _is_group(command) -> bool:
    return hasattr(command, "commands")  # typer ships its own click: no isinstance check


ALL_COMMANDS = {
    **_compose_commands(),
    **_k8s_commands(),
    **_systemd_commands(),
    **_dockerfile_command(),
}


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_every_role_is_deployed_everywhere():
    roles = {
        ("worker", "inference"),
        ("worker", "train"),
        ("adapter", "slack"),
        ("adapter", "telegram"),
        ("adapter", "web"),
    }
    for tool in ("compose", "kubernetes", "systemd"):
        run = {tuple(args) for where, args in ALL_COMMANDS.items() if where.startswith(tool)}
        assert run == roles, f"{tool} runs {sorted(run)}"


@pytest.mark.parametrize("where", sorted(ALL_COMMANDS))
def test_every_command_exists_in_the_cli(where):
    args = ALL_COMMANDS[where]
    command = _resolve(args)
    # A command that does something, or the image's default: `sprbot --help`.
    assert command.callback is not None or args == ["--help"]


def test_a_command_that_does_not_exist_is_caught():
    # The check above must be able to fail.
    with pytest.raises(AssertionError, match="is not a command"):
        _resolve(["worker", "gpu"])
    with pytest.raises(AssertionError, match="is not an option"):
        _resolve(["worker", "train", "--bust"])
    with pytest.raises(AssertionError, match="names a group"):
        _resolve(["adapter"])


_VARIABLE = re.compile(r"\b" + ENV_PREFIX + r"[A-Z0-9_]*[A-Z0-9](_\*)?")


def test_every_sprbot_variable_named_is_a_setting():
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "docs" / "DEPLOY.md"]
    named: dict[str, set[str]] = {}
    for path in files:
        for match in _VARIABLE.finditer(path.read_text()):
            named.setdefault(match.group(0), set()).add(str(path.relative_to(ROOT)))
    assert len(named) >= 20  # the pattern does find them
    unknown = {}
    for name, where in named.items():
        if name.endswith("_*"):  # a family, e.g. SPRBOT_REDIS_SSL_*
            if not any(s.startswith(name[:-1]) for s in settings):
                unknown[name] = where
        elif name not in settings:
            unknown[name] = where
    assert not unknown, f"not settings: {unknown}"


def test_keda_scales_the_inference_workers_on_the_request_stream():
    scaled = _k8s("ScaledObject", "sprbot-inference")
    target = _k8s("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert [c["args"] for c in _containers(target)] == [["worker", "inference"]]
    assert "replicas" not in target["spec"]  # KEDA owns the count

    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    assert {t["metadata"]["stream"] for t in triggers} == {REQUESTS}
    by_kind = {
        ("pendingEntriesCount" if "pendingEntriesCount" in t["metadata"] else "streamLength"): t
        for t in triggers
    }
    assert set(by_kind) == {"pendingEntriesCount", "streamLength"}
    pending = by_kind["pendingEntriesCount"]["metadata"]
    assert pending["consumerGroup"] == REQUEST_GROUP
    # Without consumerGroup the scaler reads XLEN; with it, XPENDING.
    assert "consumerGroup" not in by_kind["streamLength"]["metadata"]
    # The thresholds are sized on the configured batch (keda.yaml says why).
    max_batch = int(_k8s("ConfigMap", "sprbot-config")["data"]["SPRBOT_MAX_BATCH"])
    assert int(by_kind["streamLength"]["metadata"]["streamLength"]) == max_batch
    assert 0 < int(pending["pendingEntriesCount"]) <= max_batch

    # It reaches the Redis Service of the manifests, with the password of its Secret.
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    service = _k8s("Service", "sprbot-redis")
    port = service["spec"]["ports"][0]["port"]
    for trigger in triggers:
        expected = f"{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"
        assert trigger["metadata"]["address"] == expected
        auth = _k8s("TriggerAuthentication", trigger["authenticationRef"]["name"])
        [ref] = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "password"
        secrets = yaml.safe_load_all((K8S / "secrets.example.yaml").read_text())
        secret = next(s for s in secrets if s["metadata"]["name"] == ref["name"])
        assert ref["key"] in secret["stringData"]


@pytest.mark.parametrize("name", ["sprbot-inference", "sprbot-train"])
def test_workers_get_whole_exclusive_cores(name):
    """Guaranteed QoS with integer CPUs: the static CPU manager gives them exclusive cores."""
    for container in _containers(_k8s("Deployment", name)):
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]
        assert set(resources["limits"]) == {"cpu", "memory"}
        cpu = resources["limits"]["cpu"]
        assert isinstance(cpu, str) and cpu.isdigit() and int(cpu) >= 1, cpu
        threads = {e["name"]: e for e in container["env"]}["OMP_NUM_THREADS"]
        assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_pods_run_as_non_root_on_a_read_only_root():
    for obj in _k8s_objects():
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_workers_share_the_models_volume():
    claim = _k8s("PersistentVolumeClaim", "sprbot-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes
    for name in ("sprbot-inference", "sprbot-train"):
        pod = _k8s("Deployment", name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        [mount] = [
            m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/data/models"
        ]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "sprbot-models"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("inference", "train"):
        assert "models:/data/models" in services[name]["volumes"]


def test_dockerfile_runs_as_non_root_with_cpu_torch():
    stages = _dockerfile_stages()
    for stage in stages:
        if "ENTRYPOINT" in stage:
            user = stage.get("USER", "root").split(":")[0]
            assert user not in ("root", "0"), f"stage {stage['FROM']} runs as root"
    text = DOCKERFILE.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    # The same torch as `make install`.
    makefile_torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert f"ARG TORCH_VERSION={makefile_torch.group(1)}" in text
    assert "VOLUME" in text and "/data/models" in text


def test_compose_has_health_checks_aof_and_the_dashboard_profile():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert services["rq-dashboard"]["profiles"] == ["dashboard"]
    for name, service in services.items():
        if name != "redis":
            assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_systemd_units_verify(tmp_path):
    units = sorted(SYSTEMD.glob("*.service")) + sorted(SYSTEMD.glob("*.target"))
    metrics_ports = []
    for path in units:
        unit = _unit(path)
        assert _values(unit, "Unit", "Description"), path.name
        if path.suffix == ".service":
            assert _values(unit, "Service", "User") == ["sprbot"]
            assert _values(unit, "Service", "EnvironmentFile") == ["/etc/sprbot/sprbot.env"]
            assert _values(unit, "Install", "WantedBy") == ["sprbot.target"]
            for env in _values(unit, "Service", "Environment"):
                name, _, value = env.partition("=")
                if name == "SPRBOT_METRICS_PORT":
                    instances = ["0", "1"] if "%i" in value else [""]
                    metrics_ports += [value.replace("%i", i) for i in instances]
    # One box, one port per process (two inference instances counted).
    assert len(metrics_ports) == len(set(metrics_ports)) == 6

    tool = shutil.which("systemd-analyze")
    if tool is None:
        return  # parsed and checked above; systemd's own parser is the stricter check
    # systemd checks that ExecStart's program exists: point it at this checkout's sprbot.
    # numactl may be absent here; another executable stands in, the syntax is what counts.
    sprbot = shutil.which("sprbot", path=str(Path(sys.executable).parent))
    assert sprbot, "the sprbot console script is not installed in this environment"
    for path in units:
        text = path.read_text().replace("/opt/sprbot/venv/bin/sprbot", sprbot)
        if not Path("/usr/bin/numactl").exists():
            text = text.replace("/usr/bin/numactl", shutil.which("true") or "/bin/true")
        (tmp_path / path.name).write_text(text)
    names = [p.name.replace("@.service", "@0.service") for p in units]
    result = subprocess.run(
        [tool, "verify", "--man=no", *names], cwd=tmp_path, capture_output=True, text=True
    )
    # verify exits 0 on most mistakes and only warns: no output is the pass.
    assert result.returncode == 0 and result.stderr == "", result.stderr
