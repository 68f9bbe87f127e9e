"""deploy/ agrees with the code it runs.

Parses every YAML file under deploy/ (``yaml.safe_load_all``) and the Dockerfile (as text) and
checks the fields that tie them to mechray: kinds and apiVersions, the Serve import path and its
arguments, the RayJob entrypoint (a script that exists, flags its argparse accepts), the images
(``rayproject/ray`` at the installed Ray version, or mechray's image built from it), the GPU
worker group, Ray token auth on head and workers, the API token from a Secret, and that no file
holds AWS keys or literal secrets. The checkers return lists of problems; the last tests feed
them crafted bad input to show they catch what they are meant to.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import tomllib
import yaml
from packaging.specifiers import SpecifierSet

from mechray.version import __version__ as mechray_version

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
EXAMPLE = "examples/ray_train_capture.py"
RAY_VERSION = ray.__version__
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# the version has one source, mechray/version.py, which pyproject reads (dynamic = ["version"])
assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "mechray.version.__version__"
MECHRAY_VERSION = mechray_version

SERVE_IMPORT_PATH = "mechray.serve:build_app"
# The application builder's documented arguments (mechray.serve:build_app).
BUILD_APP_ARGS = {"storage", "s3_endpoint_url", "model_checkpoint", "num_replicas",
                  "max_ongoing_requests", "autoscaling_config"}
RAY_CRD_KINDS = {"RayCluster", "RayJob", "RayService"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAY_AUTH_SECRET_KEY = "auth_token"   # the key KubeRay reads from authOptions.secretName
GPU = "nvidia.com/gpu"

EXPECTED_KINDS = {
    "kuberay/raycluster.yaml": ["RayCluster"],
    "kuberay/rayjob.yaml": ["RayJob"],
    "kuberay/rayservice.yaml": ["RayService"],
    "kuberay/serviceaccount.yaml": ["ServiceAccount"],
    "kuberay/secrets.example.yaml": ["Secret", "Secret"],
}


# --------------------------------------------------------------------------- loading

def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def _one(rel: str) -> dict:
    docs = _docs(DEPLOY / rel)
    assert len(docs) == 1, f"{rel}: expected one document, found {len(docs)}"
    return docs[0]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def _arg_defaults(instructions, before_first_from: bool) -> dict[str, str]:
    values: dict[str, str] = {}
    for word, rest in instructions:
        if word == "FROM" and before_first_from:
            break
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            values[name.strip()] = _substitute(default.strip().strip('"'), values)
    return values


def _dockerfile_base_image() -> str:
    instructions = _dockerfile()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 1, "deploy/Dockerfile: expected one FROM"
    return _substitute(froms[0].split()[0], _arg_defaults(instructions, before_first_from=True))


def _dockerfile_env(name: str) -> str | None:
    for word, rest in _dockerfile():
        if word == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                if sep and key == name:
                    return value
    return None


def _makefile_torch_pin() -> str | None:
    match = re.search(r"torch==([0-9][\w.+]*)", (REPO / "Makefile").read_text())
    return match[1] if match else None


# --------------------------------------------------------------------------- checkers

AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET_WITH_VALUE = re.compile(
    r"aws_secret_access_key['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", re.IGNORECASE)
AWS_CREDENTIAL_NAMES = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
SECRET_LIKE_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY", re.IGNORECASE)


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def credential_problems(text: str) -> list[str]:
    """AWS keys in a file's text, or AWS credentials set in YAML at all (IAM roles only)."""
    problems = [f"AWS access key id {m[0][:8]}..." for m in AWS_KEY_ID.finditer(text)]
    problems += [f"aws_secret_access_key with a value: {m[0][:30]}..."
                 for m in AWS_SECRET_WITH_VALUE.finditer(text)]
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        docs = []
    for doc in docs:
        for path, node in _walk(doc):
            if not isinstance(node, dict):
                continue
            for key in node:
                if str(key).lower() in AWS_CREDENTIAL_NAMES:
                    problems.append(f"{path}.{key}: AWS credential in a file")
            if str(node.get("name", "")).lower() in AWS_CREDENTIAL_NAMES and (
                    "value" in node or "valueFrom" in node):
                problems.append(f"{path}: env {node['name']} set; S3 access must come from "
                                "the IAM role, not keys")
    return problems


def literal_secret_env_problems(doc: dict) -> list[str]:
    """Env vars that look like secrets must come from a secretKeyRef, never a literal value."""
    problems = []
    for path, node in _walk(doc):
        if isinstance(node, dict) and isinstance(node.get("name"), str) and (
                "value" in node or "valueFrom" in node):
            if SECRET_LIKE_ENV.search(node["name"]) and (
                    "value" in node or "secretKeyRef" not in (node.get("valueFrom") or {})):
                problems.append(f"{path}: {node['name']} is not read from a secretKeyRef")
    return problems


def cluster_spec(doc: dict) -> dict:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService."""
    return {"RayCluster": lambda d: d["spec"],
            "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def pod_groups(spec: dict) -> list[tuple[str, dict]]:
    """(group label, pod template spec) for the head and every worker group."""
    groups = [("head", spec["headGroupSpec"]["template"]["spec"])]
    groups += [(f"worker group {g['groupName']}", g["template"]["spec"])
               for g in spec.get("workerGroupSpecs", [])]
    return groups


def ray_container(pod_spec: dict) -> dict:
    return pod_spec["containers"][0]   # KubeRay treats the first container as the Ray container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(entry: dict | None) -> dict | None:
    return ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")


def token_auth_problems(spec: dict) -> list[str]:
    """Ray token auth on: authOptions, and RAY_AUTH_MODE/RAY_AUTH_TOKEN on head and workers."""
    problems = []
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token":
        problems.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token'")
    for label, pod in pod_groups(spec):
        env = _env(ray_container(pod))
        if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
            problems.append(f"{label}: RAY_AUTH_MODE is not 'token'")
        ref = _secret_ref(env.get("RAY_AUTH_TOKEN"))
        if ref is None or "value" in (env.get("RAY_AUTH_TOKEN") or {}):
            problems.append(f"{label}: RAY_AUTH_TOKEN does not come from a secretKeyRef")
            continue
        if ref.get("key") != RAY_AUTH_SECRET_KEY:
            problems.append(f"{label}: RAY_AUTH_TOKEN reads key {ref.get('key')!r}, KubeRay "
                            f"uses {RAY_AUTH_SECRET_KEY!r}")
        if auth.get("secretName") and ref.get("name") != auth["secretName"]:
            problems.append(f"{label}: RAY_AUTH_TOKEN reads Secret {ref.get('name')!r} but "
                            f"authOptions.secretName is {auth['secretName']!r}")
    return problems


def api_token_problems(spec: dict) -> list[str]:
    """MECHRAY_API_TOKEN from a Secret on every Ray container (Serve replicas go anywhere)."""
    problems = []
    for label, pod in pod_groups(spec):
        entry = _env(ray_container(pod)).get("MECHRAY_API_TOKEN")
        if entry is None:
            problems.append(f"{label}: MECHRAY_API_TOKEN not set")
        elif "value" in entry or _secret_ref(entry) is None:
            problems.append(f"{label}: MECHRAY_API_TOKEN is not read from a secretKeyRef")
    return problems


def image_problems(image: str, gpu: bool = False) -> list[str]:
    """The official Ray image at the installed version, or mechray's image built from it."""
    repo, _, tag = image.rpartition(":")
    if "/" in tag or not repo:
        return [f"{image}: no tag"]
    variant = re.search(r"-(cpu|gpu|cu\d+)$", tag)
    problems = []
    if repo == "rayproject/ray":
        if not (tag == RAY_VERSION or tag.startswith(f"{RAY_VERSION}-")):
            problems.append(f"{image}: Ray {RAY_VERSION} is installed")
    elif repo == "mechray" or repo.endswith("/mechray"):
        if not re.fullmatch(rf"{re.escape(MECHRAY_VERSION)}-ray{re.escape(RAY_VERSION)}"
                            r"-py3\d+-(cpu|gpu|cu\d+)", tag):
            problems.append(f"{image}: expected tag {MECHRAY_VERSION}-ray{RAY_VERSION}-py3NN-"
                            "cpu|gpu|cuNNN (mechray and Ray versions)")
    else:
        problems.append(f"{image}: neither rayproject/ray nor mechray's image")
    if gpu and not (variant and variant[1] != "cpu"):
        problems.append(f"{image}: a GPU group needs a -gpu/-cuNNN image")
    return problems


def _gpu_limit(pod: dict) -> float:
    limits = ray_container(pod).get("resources", {}).get("limits", {})
    return float(limits.get(GPU, 0))


def _help_options(script: Path) -> dict[str, bool]:
    """{--option: takes a value} from the script's own --help."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    options = {}
    for match in re.finditer(r"^\s+(?:-\w, )?(--[\w-]+)( [A-Z][A-Z0-9_]*)?", out.stdout,
                             re.MULTILINE):
        options[match[1]] = bool(match[2])
    assert "--help" in options, f"could not read options from:\n{out.stdout}"
    return options


def entrypoint_problems(argv: list[str], options: dict[str, bool]) -> list[str]:
    problems, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            name, eq, _ = token.partition("=")
            if name not in options:
                problems.append(f"{name}: not an option of the script ({sorted(options)})")
            elif options[name] and not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    problems.append(f"{name}: needs a value")
                i += 1
        else:
            problems.append(f"{token}: stray argument")
        i += 1
    return problems


def _example_s3_prefix() -> str | None:
    tree = ast.parse((REPO / EXAMPLE).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "s3_prefix" and isinstance(
                node.value, ast.Constant):
            return node.value.value
    return None


def _flag(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.partition("=")[2]
    return None


def _serve_schema():
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed")
    return schema.ServeDeploySchema


def _mechray_app(config: dict) -> dict:
    apps = [a for a in config.get("applications", []) if a.get("import_path") == SERVE_IMPORT_PATH]
    assert len(apps) == 1, f"expected one application with import_path {SERVE_IMPORT_PATH}"
    return apps[0]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _one("kuberay/rayjob.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _one("kuberay/rayservice.yaml")


@pytest.fixture(scope="module")
def ray_crs() -> list[tuple[str, dict]]:
    return [(_rel(p), d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)
            if d.get("kind") in RAY_CRD_KINDS]


@pytest.fixture(scope="module")
def entrypoint_argv(rayjob) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


@pytest.fixture(scope="module")
def script_options() -> dict[str, bool]:
    return _help_options(REPO / EXAMPLE)


# --------------------------------------------------------------------------- structure

def test_every_yaml_file_parses_and_is_expected():
    files = {_rel(p): _docs(p) for p in _yaml_files()}
    assert set(EXPECTED_KINDS) <= set(files), f"missing: {set(EXPECTED_KINDS) - set(files)}"
    assert {"serve_config.yaml", "cluster/aws.yaml"} <= set(files)
    for rel, kinds in EXPECTED_KINDS.items():
        assert [d.get("kind") for d in files[rel]] == kinds, rel
    for rel, docs in files.items():
        assert docs, f"{rel} is empty"
        if rel.startswith("kuberay/"):
            for doc in docs:
                assert doc.get("metadata", {}).get("name"), f"{rel}: {doc.get('kind')} unnamed"
                expected = "ray.io/v1" if doc["kind"] in RAY_CRD_KINDS else "v1"
                assert doc.get("apiVersion") == expected, f"{rel}: {doc['kind']} apiVersion"


def test_ray_clusters_run_the_installed_ray_version_and_mechray_images(ray_crs):
    assert {d["kind"] for _, d in ray_crs} == RAY_CRD_KINDS
    base = _dockerfile_base_image()
    for rel, doc in ray_crs:
        spec = cluster_spec(doc)
        assert spec.get("rayVersion") == RAY_VERSION, f"{rel}: rayVersion"
        for label, pod in pod_groups(spec):
            image = ray_container(pod)["image"]
            assert image_problems(image, gpu=_gpu_limit(pod) > 0) == [], f"{rel} {label}"
            if not image.startswith("rayproject/ray:"):   # mechray's own image: built FROM it
                assert base.startswith(f"rayproject/ray:{RAY_VERSION}-"), base


@pytest.mark.parametrize("rel", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_cpu_head_and_autoscaling_gpu_worker_group(rel):
    spec = cluster_spec(_one(rel))
    head = spec["headGroupSpec"]["template"]["spec"]
    assert _gpu_limit(head) == 0, f"{rel}: the head is CPU-only"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpu_limit(g["template"]["spec"]) >= 1]
    assert gpu_groups, f"{rel}: no worker group with a {GPU} limit"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        requests = ray_container(pod)["resources"].get("requests", {})
        assert float(requests.get(GPU, _gpu_limit(pod))) == _gpu_limit(pod)
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) \
            <= group["maxReplicas"], f"{rel}: {group['groupName']} replica bounds"
        assert group["maxReplicas"] > group["minReplicas"], f"{rel}: nothing to autoscale"
        assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), \
            f"{rel}: GPU nodes are usually tainted {GPU}; tolerate it"
    assert spec.get("enableInTreeAutoscaling") is True, f"{rel}: autoscaling off"


def test_ray_token_auth_on_head_and_workers(ray_crs):
    for rel, doc in ray_crs:
        assert token_auth_problems(cluster_spec(doc)) == [], rel


def test_pods_use_the_iam_role_service_account(ray_crs):
    account = _one("kuberay/serviceaccount.yaml")
    role = account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), role
    for rel, doc in ray_crs:
        for label, pod in pod_groups(cluster_spec(doc)):
            assert pod.get("serviceAccountName") == account["metadata"]["name"], f"{rel} {label}"
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{rel} {label}"


def test_every_secret_reference_has_its_shape_in_the_example():
    example = _docs(KUBERAY / "secrets.example.yaml")
    declared = {(s["metadata"]["name"], key) for s in example for key in s.get("stringData", {})}
    for secret in example:
        assert "data" not in secret, "use stringData placeholders, not encoded data"
        for key, value in secret["stringData"].items():
            assert "REPLACE" in value, f"{secret['metadata']['name']}.{key} is not a placeholder"
    referenced = set()
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            for _, node in _walk(doc):
                if isinstance(node, dict) and isinstance(node.get("secretKeyRef"), dict):
                    ref = node["secretKeyRef"]
                    referenced.add((ref["name"], ref["key"]))
                if isinstance(node, dict) and isinstance(node.get("authOptions"), dict) \
                        and node["authOptions"].get("secretName"):
                    referenced.add((node["authOptions"]["secretName"], RAY_AUTH_SECRET_KEY))
    assert referenced and referenced <= declared, f"undeclared: {referenced - declared}"


# --------------------------------------------------------------------------- RayJob

def test_rayjob_runs_the_example_from_the_image(rayjob, entrypoint_argv):
    spec = rayjob["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("submissionMode") in SUBMISSION_MODES
    assert Path(entrypoint_argv[0]).name in {"python", "python3"}, entrypoint_argv
    home = _dockerfile_env("MECHRAY_HOME")
    assert home, "deploy/Dockerfile sets no MECHRAY_HOME"
    script = entrypoint_argv[1]
    assert script.startswith(home.rstrip("/") + "/"), f"{script} is not under {home}"
    rel = script[len(home.rstrip("/")) + 1:]
    assert rel == EXAMPLE and (REPO / rel).is_file(), rel
    copied = {source.rstrip("/") for word, rest in _dockerfile() if word == "COPY"
              for source in [t for t in shlex.split(rest) if not t.startswith("--")][:-1]}
    assert rel.split("/")[0] in copied, f"the Dockerfile does not copy {rel.split('/')[0]}/"


def test_rayjob_flags_are_accepted_by_the_example(entrypoint_argv, script_options):
    assert entrypoint_problems(entrypoint_argv[2:], script_options) == []
    assert _flag(entrypoint_argv, "--s3-bucket"), "the RayJob must capture to S3"
    assert not _flag(entrypoint_argv, "--s3-endpoint-url"), "on AWS the default endpoint is used"


# --------------------------------------------------------------------------- Serve

def test_rayservice_serves_build_app_over_what_the_rayjob_captured(rayservice, entrypoint_argv):
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    _serve_schema().model_validate(config)   # what the KubeRay operator hands to Serve
    app = _mechray_app(config)
    assert app.get("route_prefix", "/") == "/"
    args = app.get("args") or {}
    assert set(args) <= BUILD_APP_ARGS, f"unknown build_app args {set(args) - BUILD_APP_ARGS}"
    storage = args.get("storage", "")
    match = re.fullmatch(r"s3://([^/]+)(?:/(.*?))?/?", storage)
    assert match, f"storage {storage!r} is not an s3:// URI"
    assert match[1] == _flag(entrypoint_argv, "--s3-bucket"), "serves another bucket than the job"
    prefix = _example_s3_prefix()
    if prefix is not None:
        assert (match[2] or "") == prefix.strip("/"), f"the example writes under {prefix!r}"


def test_rayservice_api_token_comes_from_a_secret(rayservice):
    assert api_token_problems(cluster_spec(rayservice)) == []


def test_no_literal_secrets_in_any_manifest():
    for path in _yaml_files():
        for doc in _docs(path):
            assert literal_secret_env_problems(doc) == [], _rel(path)


def test_local_serve_config_is_accepted_by_serve():
    config = _one("serve_config.yaml")
    _serve_schema().model_validate(config)
    assert config["http_options"]["host"] == "127.0.0.1"
    app = _mechray_app(config)
    assert app.get("name") and app.get("route_prefix") == "/"
    args = app.get("args") or {}
    assert args.get("storage"), "args.storage is required"
    assert set(args) <= BUILD_APP_ARGS, f"unknown build_app args {set(args) - BUILD_APP_ARGS}"


def _serve_module() -> Path | None:
    for candidate in (REPO / "mechray" / "serve.py", REPO / "mechray" / "serve" / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_import_path_resolves_to_build_app():
    module = _serve_module()
    if module is None:
        pytest.skip("mechray/api/serve_app.py does not exist yet; cannot check that it defines build_app")
    tree = ast.parse(module.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    assert "build_app" in names, f"{module.relative_to(REPO)} defines no build_app"


def test_api_reads_the_token_the_manifests_set():
    if _serve_module() is None:
        pytest.skip("mechray/api/serve_app.py does not exist yet; cannot check MECHRAY_API_TOKEN use")
    sources = (p.read_text() for p in (REPO / "mechray").rglob("*.py"))
    assert any("MECHRAY_API_TOKEN" in text for text in sources)


# --------------------------------------------------------------------------- Dockerfile

def test_dockerfile_builds_mechray_on_the_installed_ray():
    instructions = _dockerfile()
    defaults = _arg_defaults(instructions, before_first_from=True)
    base = _dockerfile_base_image()
    assert base == "rayproject/ray:{}-{}".format(defaults.get("RAY_VERSION"),
                                                  defaults.get("RAY_IMAGE_VARIANT"))
    assert defaults.get("RAY_VERSION") == RAY_VERSION
    variant = re.fullmatch(r"py3(\d+)-(cpu|gpu|cu\d+)", defaults["RAY_IMAGE_VARIANT"])
    assert variant, defaults["RAY_IMAGE_VARIANT"]
    assert f"3.{variant[1]}" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    stage_args = _arg_defaults(instructions, before_first_from=False)
    pin = _makefile_torch_pin()
    if pin is not None:
        assert stage_args.get("TORCH_VERSION") == pin, "torch pin differs from the Makefile's"
    assert re.search(r'torch==\$\{TORCH_VERSION\}"? --index-url "?\$\{TORCH_INDEX_URL\}', runs)
    assert stage_args.get("TORCH_INDEX_URL", "").startswith("https://download.pytorch.org/whl/")
    assert "all" in stage_args.get("MECHRAY_EXTRAS", "").split(",")
    assert re.search(r'pip install [^&]*"\.\[\$\{MECHRAY_EXTRAS\}\]"', runs), "installs the repo"
    for word, rest in instructions:
        if word == "COPY":
            for source in [t for t in shlex.split(rest) if not t.startswith("--")][:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repo"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run non-root"
    assert not any(re.search(r"AWS_|SECRET|PASSWORD|_TOKEN", rest, re.IGNORECASE)
                   for word, rest in instructions if word in {"ENV", "ARG"}), "credentials baked in"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert {".venv", ".git", ".env"} <= ignored


# --------------------------------------------------------------------------- cluster launcher

def test_aws_launcher_config():
    config = _one("cluster/aws.yaml")
    try:   # what `ray up` checks: defaults filled in, then Ray's cluster schema
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:   # a private module; fall back to the schema file Ray ships
        import json

        import jsonschema

        schema = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
        jsonschema.validate(config, json.loads(schema.read_text()))
    else:
        validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [name for name, t in types.items()
                 if t.get("resources", {}).get("GPU", 0) >= 1 and name != config["head_node_type"]]
    assert gpu_types, "no GPU worker node type"
    for name in gpu_types:
        assert re.match(r"(g\d|p\d)", types[name]["node_config"]["InstanceType"]), name
        assert types[name].get("max_workers", 0) > types[name].get("min_workers", 0)
    for name, node_type in types.items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"{name}: no IAM instance profile"
    docker = config["docker"]
    head_image = docker.get("head_image", docker.get("image"))
    assert image_problems(head_image) == []
    for name in gpu_types:
        image = types[name].get("docker", {}).get("worker_image",
                                                  docker.get("worker_image", docker.get("image")))
        assert image_problems(image, gpu=True) == [], name
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert any(remote.endswith(".ray/auth_token") for remote in config["file_mounts"])
    setup = " ".join(config["setup_commands"])
    assert re.search(r"pip install .*mechray\[all\]", setup), "setup does not install mechray"
    assert f"ray=={RAY_VERSION}" in setup, "setup may change the image's Ray"
    pin = _makefile_torch_pin()
    if pin is not None:
        assert f"torch=={pin}" in setup


# --------------------------------------------------------------------------- no credentials

def test_no_aws_credentials_anywhere_under_deploy():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        assert credential_problems(path.read_text()) == [], _rel(path)


# --------------------------------------------------------------------------- the checkers bite

FAKE_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"          # AWS's documented example key id
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"


def test_credential_checker_catches_keys_in_a_modified_manifest():
    text = (KUBERAY / "rayjob.yaml").read_text()
    assert credential_problems(text) == []
    with_key_id = text.replace("value: us-west-2", f"value: {FAKE_KEY_ID}", 1)
    assert any("access key id" in p for p in credential_problems(with_key_id))
    assert credential_problems(f"aws_secret_access_key = {FAKE_SECRET}\n")
    assert credential_problems(f"[default]\naws_secret_access_key={FAKE_SECRET}\n")
    env_key = text.replace(
        "- name: AWS_REGION\n",
        f"- name: AWS_SECRET_ACCESS_KEY\n                  value: {FAKE_SECRET}\n"
        "                - name: AWS_REGION\n", 1)
    assert any("AWS_SECRET_ACCESS_KEY" in p for p in credential_problems(env_key))
    # keys from a Secret are still keys: S3 access must come from the IAM role
    assert credential_problems(yaml.safe_dump({"env": [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}))
    # prose naming the variables is fine
    assert credential_problems("No manifest sets AWS_SECRET_ACCESS_KEY.\n") == []


def test_token_checkers_catch_literal_missing_and_mismatched_tokens(rayservice):
    spec = cluster_spec(rayservice)
    literal = copy.deepcopy(spec)
    env = ray_container(literal["workerGroupSpecs"][0]["template"]["spec"])["env"]
    for entry in env:
        if entry["name"] == "MECHRAY_API_TOKEN":
            entry.pop("valueFrom")
            entry["value"] = "hunter2"
    assert any("MECHRAY_API_TOKEN" in p for p in api_token_problems(literal))
    assert literal_secret_env_problems({"spec": literal})

    no_mode = copy.deepcopy(spec)
    worker = ray_container(no_mode["workerGroupSpecs"][0]["template"]["spec"])
    worker["env"] = [e for e in worker["env"] if e["name"] != "RAY_AUTH_MODE"]
    assert any("RAY_AUTH_MODE" in p for p in token_auth_problems(no_mode))

    other_secret = copy.deepcopy(spec)
    head = ray_container(other_secret["headGroupSpec"]["template"]["spec"])
    _secret_ref(_env(head)["RAY_AUTH_TOKEN"])["name"] = "some-other-secret"
    assert any("authOptions.secretName" in p for p in token_auth_problems(other_secret))

    auth_off = copy.deepcopy(spec)
    auth_off.pop("authOptions")
    assert token_auth_problems(auth_off)


def test_image_checker_catches_other_versions_and_images():
    assert image_problems(f"rayproject/ray:{RAY_VERSION}-py311-cpu") == []
    assert image_problems(f"rayproject/ray:{RAY_VERSION}-py311-cpu", gpu=True)
    assert image_problems("rayproject/ray:2.9.0-py311-gpu", gpu=True)
    assert image_problems(f"reg.example/mechray:{MECHRAY_VERSION}-ray2.9.0-py311-cpu")
    assert image_problems(f"reg.example/mechray:{MECHRAY_VERSION}-ray{RAY_VERSION}-py311-gpu",
                          gpu=True) == []
    assert image_problems("nginx:latest")
    assert image_problems("rayproject/ray")


def test_entrypoint_checker_catches_unknown_and_valueless_flags(script_options):
    assert entrypoint_problems(["--out", "/tmp/x", "--s3-bucket", "b"], script_options) == []
    assert entrypoint_problems(["--bucket", "b"], script_options)
    assert entrypoint_problems(["--s3-bucket"], script_options)
    assert entrypoint_problems(["--s3-bucket", "--out", "x"], script_options)
