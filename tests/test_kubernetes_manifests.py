"""Offline checks of the Kubernetes deployment (``deploy/kubernetes``, ``deploy/image/Containerfile``).

There is no API server here: every manifest is validated against the Kubernetes API schema that the
``kubernetes`` package's models carry, then checked against warmboot itself (the environment variables its code
reads, its entry modules, its version) and against the other manifests (secret and config keys, ports, labels).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import tokenize
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes import client as k8s

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "image" / "Containerfile"
EXAMPLE_SECRETS = "secrets.example.yaml"
KUSTOMIZATION = "kustomization.yaml"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/warmboot/warmboot:{VERSION}"
GPU_LABEL = "nvidia.com/gpu.present"
HOME = "/var/lib/warmboot"


def load(name: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document under deploy/kubernetes (or in the one file ``name``)."""
    paths = [MANIFESTS / name] if name else sorted(MANIFESTS.iterdir())
    return [(p.name, doc) for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc is not None]


def api_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in load() if f != KUSTOMIZATION]


def label(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"


def objects(kind: str) -> list[dict[str, Any]]:
    return [d for f, d in api_objects() if d["kind"] == kind and f != EXAMPLE_SECRETS]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in objects(kind) if d["metadata"]["name"] == name]
    return found


# --- the API schema ---------------------------------------------------------------------------------------

_LIST = re.compile(r"^(?:list|List)\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")
#: JSON types of the schema's scalars; bytes and datetimes are written as strings in a manifest.
_SCALARS: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "bytes": str,
    "datetime": str,
    "date": str,
}


def model_class(api_version: str, kind: str) -> type:
    """``apps/v1`` + ``DaemonSet`` -> ``V1DaemonSet``."""
    return getattr(k8s, api_version.rpartition("/")[2].capitalize() + kind)


@functools.cache
def required_keys(cls: type) -> frozenset[str]:
    """The JSON keys ``cls`` requires: pydantic fields without default (kubernetes >= 36), or else the attributes
    whose generated setter rejects None when client-side validation is on (earlier releases)."""
    fields = getattr(cls, "model_fields", None)
    if fields is not None:
        return frozenset(cls.attribute_map[a] for a, f in fields.items() if f.is_required() and a in cls.attribute_map)
    probe = object.__new__(cls)
    probe.local_vars_configuration = k8s.Configuration()
    required = set()
    for attr, key in cls.attribute_map.items():
        try:
            setattr(probe, attr, None)
        except ValueError:
            required.add(key)
    return frozenset(required)


def schema_errors(value: Any, type_name: str, path: str = "") -> list[str]:
    """What in ``value`` breaks the schema of ``type_name`` (a model name or a type string of ``openapi_types``):
    unknown fields, wrong JSON types, missing required fields, each with its path.

    Hand-written because the package cannot be asked this: up to release 35 its deserializer drops unknown
    fields without a word (a misspelled ``securityContex`` would pass), and the later pydantic models report in
    their own terms and stop at the first model. This walks ``openapi_types`` and ``attribute_map``, which every
    release has, and reports every problem with a path an operator can find in the YAML.
    """
    where = path or "(document)"
    if match := _LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, match[1], f"{path}[{i}]")]
    if match := _DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {type(value).__name__}"]
        return [e for k, item in value.items() for e in schema_errors(item, match[1] or match[2], f"{path}.{k}")]
    if type_name == "object":  # int-or-string and free-form fields
        return []
    if type_name in _SCALARS:
        if isinstance(value, _SCALARS[type_name]) and (type_name == "bool") == isinstance(value, bool):
            return []
        return [f"{where}: expected {type_name}, got {type(value).__name__} {value!r}"]
    cls = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({type_name}), got {type(value).__name__}"]
    attr_of = {key: attr for attr, key in cls.attribute_map.items()}
    errors = [f"{path}.{key}".lstrip(".") + ": required field missing" for key in sorted(required_keys(cls))
              if value.get(key) is None]  # fmt: skip
    for key, item in value.items():
        sub = f"{path}.{key}".lstrip(".")
        if key not in attr_of:
            errors.append(f"{sub}: unknown field")
        elif item is not None:
            errors += schema_errors(item, cls.openapi_types[attr_of[key]], sub)
    return errors


def validate(doc: dict[str, Any]) -> list[str]:
    """``schema_errors`` of a whole manifest, each prefixed with its kind and name."""
    try:
        cls = model_class(doc["apiVersion"], doc["kind"])
    except (KeyError, AttributeError):
        return [f"{label(doc)}: no Kubernetes model for apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}"]
    return [f"{label(doc)}: {e}" for e in schema_errors(doc, cls.__name__)]


@pytest.mark.parametrize(("file", "doc"), api_objects(), ids=lambda v: v if isinstance(v, str) else label(v))
def test_manifest_follows_the_kubernetes_api_schema(file: str, doc: dict[str, Any]) -> None:
    assert validate(doc) == []
    if doc["kind"] != "Namespace":
        assert doc["metadata"].get("namespace") == "warmboot", f"{file}: {label(doc)} is outside the namespace"


def test_the_validator_reports_misspellings_wrong_types_and_missing_fields() -> None:
    agent = copy.deepcopy(one("DaemonSet", "warmboot-agent"))
    container = agent["spec"]["template"]["spec"]["containers"][0]
    container["securityContex"] = container.pop("securityContext")
    container["ports"][0]["containerPort"] = "8702"
    [plain, *_] = [i for i, var in enumerate(container["env"]) if "value" in var]
    container["env"][plain]["value"] = 8702
    del container["name"]
    agent["spec"]["template"]["spec"]["hostPID"] = "false"
    containers = "DaemonSet warmboot-agent: spec.template.spec.containers[0]"
    assert sorted(validate(agent)) == sorted(
        [
            f"{containers}.securityContex: unknown field",
            f"{containers}.ports[0].containerPort: expected int, got str '8702'",
            f"{containers}.env[{plain}].value: expected str, got int 8702",
            f"{containers}.name: required field missing",
            "DaemonSet warmboot-agent: spec.template.spec.hostPID: expected bool, got str 'false'",
        ]
    )
    assert validate({"apiVersion": "apps/v1", "kind": "DaemonSett", "metadata": {"name": "x"}}) == [
        "DaemonSett x: no Kubernetes model for apiVersion/kind apps/v1/DaemonSett"
    ]


# --- consistency with warmboot and between the manifests -------------------------------------------------


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(label(d), d["spec"]["template"]["spec"]) for d in objects("Deployment") + objects("DaemonSet")]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def example_keys(kind: str) -> dict[str, set[str]]:
    """Keys of the example secrets (``kind`` Secret) or of the shipped ConfigMaps, by name."""
    docs = [d for _, d in load(EXAMPLE_SECRETS)] if kind == "Secret" else objects("ConfigMap")
    return {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in docs if d["kind"] == kind
    }


def warmboot_names(path: Path) -> set[str]:
    """The ``WARMBOOT_*`` names in the string literals (not the comments) of a Python file."""
    kinds = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    with path.open("rb") as f:
        strings = [t.string for t in tokenize.tokenize(f.readline) if t.type in kinds]
    return {name for s in strings for name in re.findall(r"WARMBOOT_[A-Z0-9_]*[A-Z0-9]", s)}


def test_every_warmboot_variable_set_is_read_by_the_package() -> None:
    read = {name for path in (ROOT / "warmboot").rglob("*.py") for name in warmboot_names(path)}
    config = example_keys("ConfigMap")
    set_by_manifests = set()
    for _, spec in pod_specs():
        for container in spec["containers"]:
            set_by_manifests |= set(env_of(container))
            for source_ref in container.get("envFrom", []):
                set_by_manifests |= config[source_ref["configMapRef"]["name"]]
    unread = sorted(n for n in set_by_manifests if n.startswith("WARMBOOT_") and n not in read)
    assert unread == [], f"the manifests set variables no module under warmboot/ reads: {unread}"


def test_commands_image_and_entry_modules() -> None:
    specs = pod_specs()
    expected = {"Deployment warmboot-control-plane": "warmboot.server"}
    expected |= {name: "warmboot.agent" for name, _ in specs if name.startswith("DaemonSet")}
    assert {name for name, _ in specs} == set(expected)
    for name, spec in specs:
        [container] = spec["containers"]
        assert container["image"] == IMAGE, f"{name}: the image tag must be pyproject's version {VERSION}"
        assert container["command"] == ["python", "-m", expected[name]], name
    for module in set(expected.values()):
        try:
            found = importlib.util.find_spec(f"{module}.__main__")
        except ModuleNotFoundError:
            found = None
        assert found is not None, f"`python -m {module}` has no {module.replace('.', '/')}/__main__.py"
    containerfile = CONTAINERFILE.read_text()
    assert f"-t {IMAGE} ." in containerfile, "the Containerfile's build command names another tag"
    for line in re.findall(r"^COPY (?!--from)(.+)$", containerfile, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"Containerfile copies {source}, which is not in the repository"


def test_agents_are_privileged_and_keep_their_state_on_the_node() -> None:
    agents = objects("DaemonSet")
    assert len(agents) == 2
    for agent in agents:
        spec = agent["spec"]["template"]["spec"]
        [container] = spec["containers"]
        assert container["securityContext"]["privileged"] is True, label(agent)
        assert not spec.get("hostPID", False)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts[HOME]["hostPath"] == {"path": HOME, "type": "DirectoryOrCreate"}, label(agent)
        assert mounts["/sys/fs/cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup", label(agent)
        env = env_of(container)
        assert env["WARMBOOT_HOME"]["value"] == HOME
        cache_dir = env["WARMBOOT_SNAPSHOT_CACHE_DIR"]["value"]
        [(cache_mount, cache_volume)] = [(p, v) for p, v in mounts.items() if cache_dir.startswith(p.rstrip("/") + "/")]
        assert cache_volume.get("emptyDir", {}).get("medium") == "Memory" or "hostPath" in cache_volume
        if size := cache_volume.get("emptyDir", {}).get("sizeLimit"):
            assert size.endswith("Gi"), f"{label(agent)}: sizeLimit of {cache_mount} in Gi, please"
            assert int(env["WARMBOOT_SNAPSHOT_CACHE_MB"]["value"]) < int(size[:-2]) * 1024, (
                f"{label(agent)}: the snapshot cache budget must stay under the sizeLimit of {cache_mount}"
            )
    cp = one("Deployment", "warmboot-control-plane")
    assert cp["spec"]["replicas"] == 1 and cp["spec"]["strategy"]["type"] == "Recreate"


def test_gpu_agents_request_gpus_on_gpu_nodes_and_cpu_agents_avoid_them() -> None:
    def gpus(agent: dict[str, Any]) -> str | None:
        resources = agent["spec"]["template"]["spec"]["containers"][0].get("resources", {})
        return resources.get("limits", {}).get("nvidia.com/gpu") or resources.get("requests", {}).get("nvidia.com/gpu")

    def gpu_rule(spec: dict[str, Any]) -> tuple[str, list[str]] | None:
        if GPU_LABEL in spec.get("nodeSelector", {}):
            return "In", [spec["nodeSelector"][GPU_LABEL]]
        terms = spec.get("affinity", {}).get("nodeAffinity", {})
        terms = terms.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
        rules = [(e["operator"], e["values"]) for t in terms for e in t["matchExpressions"] if e["key"] == GPU_LABEL]
        assert len(terms) <= 1, "with several nodeSelectorTerms (ORed) the GPU rule may not apply"
        return rules[0] if rules else None

    [gpu] = [a for a in objects("DaemonSet") if gpus(a)]
    [cpu] = [a for a in objects("DaemonSet") if not gpus(a)]
    gpu_spec, cpu_spec = gpu["spec"]["template"]["spec"], cpu["spec"]["template"]["spec"]
    assert int(gpus(gpu)) >= 1
    assert gpu_rule(gpu_spec) == ("In", ["true"])
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in gpu_spec["tolerations"])
    assert gpu_rule(cpu_spec) == ("NotIn", ["true"]), "CPU agents must stay off GPU nodes"
    assert gpu["spec"]["selector"] != cpu["spec"]["selector"]
    for agent in (gpu, cpu):
        assert (
            agent["spec"]["selector"]["matchLabels"].items() <= agent["spec"]["template"]["metadata"]["labels"].items()
        )


def test_secrets_and_config_referenced_are_defined_and_files_point_into_them() -> None:
    secrets, config = example_keys("Secret"), example_keys("ConfigMap")
    assert secrets == {
        "warmboot-join-token": {"token"},
        "warmboot-postgres": {"url"},
        "warmboot-s3": {"access-key", "secret-key"},
    }
    assert set(config["warmboot-config"]) >= {"WARMBOOT_S3_ENDPOINT", "WARMBOOT_S3_BUCKET", "WARMBOOT_REGISTRY"}
    for name, spec in pod_specs():
        files = {}  # path -> (secret, key), for the secrets mounted into the container
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if secret := volume.get("secret"):
                assert secret["secretName"] in secrets, f"{name}: volume of unknown secret {secret['secretName']}"
                assert {i["key"] for i in secret.get("items", [])} <= secrets[secret["secretName"]], name
        [container] = spec["containers"]
        for mount in container["volumeMounts"]:
            if secret := volumes[mount["name"]].get("secret"):
                for item in secret.get("items") or [{"key": k, "path": k} for k in secrets[secret["secretName"]]]:
                    files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
        for ref in container.get("envFrom", []):
            assert ref["configMapRef"]["name"] in config, f"{name}: envFrom an unknown ConfigMap"
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            if ref := source.get("secretKeyRef"):
                assert ref["key"] in secrets.get(ref["name"], set()), f"{name}: {var['name']} -> {ref}"
            if ref := source.get("configMapKeyRef"):
                assert ref["key"] in config.get(ref["name"], set()), f"{name}: {var['name']} -> {ref}"
            if var["name"].startswith("WARMBOOT_") and var["name"].endswith("_FILE"):
                assert var["value"] in files, f"{name}: {var['name']}={var['value']} is no mounted secret key"


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def test_ports_in_settings_match_the_containers_service_and_network_policies() -> None:
    cp = one("Deployment", "warmboot-control-plane")
    [cp_container] = cp["spec"]["template"]["spec"]["containers"]
    cp_ports = {p["name"]: p["containerPort"] for p in cp_container["ports"]}
    cp_env = env_of(cp_container)
    assert port_of(cp_env["WARMBOOT_CLUSTER_LISTEN"]["value"]) == cp_ports["cluster"] == 8701
    assert int(cp_env["WARMBOOT_GATEWAY_PORT"]["value"]) == cp_ports["gateway"] == 8700

    [service] = objects("Service")
    assert service["spec"]["selector"].items() <= cp["spec"]["template"]["metadata"]["labels"].items()
    service_ports = {p["port"]: cp_ports.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert service_ports == {8700: 8700, 8701: 8701}

    cp_labels = cp["spec"]["template"]["metadata"]["labels"]
    agent_pods = [a["spec"]["template"] for a in objects("DaemonSet")]
    policies = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: p for p in objects("NetworkPolicy")
    }
    for agent in agent_pods:
        [container] = agent["spec"]["containers"]
        env, ports = env_of(container), {p["name"]: p["containerPort"] for p in container["ports"]}
        url = urlsplit(env["WARMBOOT_CONTROL_PLANE_URL"]["value"])
        assert url.hostname in {
            f"{service['metadata']['name']}.warmboot.svc",
            f"{service['metadata']['name']}.warmboot.svc.cluster.local",
        }
        assert service_ports[url.port] == cp_ports["cluster"]
        assert port_of(env["WARMBOOT_AGENT_LISTEN"]["value"]) == ports["agent"] == 8702
        assert env["WARMBOOT_AGENT_URL"]["value"] == f"http://$(POD_IP):{ports['agent']}"
        names = [e["name"] for e in container["env"]]
        assert names.index("POD_IP") < names.index("WARMBOOT_AGENT_URL"), "$(POD_IP) expands only if set before"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["WARMBOOT_AGENT_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        # Only the control plane reaches an agent, and only on its agent port.
        [rule] = policies["agent"]["spec"]["ingress"]
        assert policies["agent"]["spec"]["podSelector"]["matchLabels"].items() <= agent["metadata"]["labels"].items()
        assert [p["port"] for p in rule["ports"]] == [ports["agent"]]
        assert [f["podSelector"]["matchLabels"].items() <= cp_labels.items() for f in rule["from"]] == [True]
        # The cluster port takes agents only; the gateway port is the only other one open.
        cp_rules = policies["control-plane"]["spec"]["ingress"]
        [cluster_rule] = [r for r in cp_rules if [p["port"] for p in r["ports"]] == [cp_ports["cluster"]]]
        assert [
            f["podSelector"]["matchLabels"].items() <= agent["metadata"]["labels"].items() for f in cluster_rule["from"]
        ] == [True]
        assert sorted(p["port"] for r in cp_rules for p in r["ports"]) == [cp_ports["gateway"], cp_ports["cluster"]]


def test_kustomization_lists_every_manifest_but_the_example_secrets() -> None:
    [(_, kustomization)] = load(KUSTOMIZATION)
    files = {p.name for p in MANIFESTS.iterdir()}
    assert all(f.endswith(".yaml") for f in files), "only .yaml files under deploy/kubernetes"
    assert sorted(kustomization["resources"]) == sorted(files - {KUSTOMIZATION, EXAMPLE_SECRETS})
    assert kustomization["namespace"] == "warmboot"
    assert "REPLACE-ME" in (MANIFESTS / EXAMPLE_SECRETS).read_text()
