"""KubeRay manifests (deploy/kuberay/) checked offline: RayCluster and RayJob against the operator's
CRD schemas, the ConfigMap and Secret against a minimal core shape, and the invariants that tie
the files to each other, to docker/ and to Lexica's own config loaders.

There is no Kubernetes API server here. What the API server would add is named where it matters:
CEL rules (refused rather than skipped), and the pod semantics the CRD schema does not carry
(requests vs limits, volume references), which are checked by hand below.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from lexica.analysis.config import AnalysisConfig
from lexica.config import from_dict, stage_section
from lexica.harvest.config import harvest_config_from_file
from lexica.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
KUBERAY_DIR = ROOT / "deploy" / "kuberay"
DOCKER_DIR = ROOT / "docker"
# The CRDs are shared data next to the checkout (../shared/kuberay-crds/README.md), not a copy; a
# clone elsewhere on this machine finds the workspace's copy.
CRD_CANDIDATES = [Path(os.environ["LEXICA_KUBERAY_CRDS"])] if os.environ.get("LEXICA_KUBERAY_CRDS") else [
    ROOT.parent / "shared" / "kuberay-crds", Path("/work/shared/kuberay-crds")]
CRD_DIR = next((path for path in CRD_CANDIDATES if path.is_dir()), CRD_CANDIDATES[0])
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFEST_FILES = ("raycluster.yaml", "rayjob.yaml", "configmap.yaml", "secret.example.yaml")
SMOLLM2_D_MODEL = 576
IMAGE_REPOSITORY = "ghcr.io/OWNER/lexica"

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB of YAML


# ---------------------------------------------------------------------------------------------
# Reading the manifests

def load_documents(path: Path) -> list[dict]:
    """Every non-empty document of a (possibly multi-document) YAML file."""
    with path.open(encoding="utf-8") as handle:
        documents = [document for document in yaml.load_all(handle, Loader=YAML_LOADER) if document is not None]
    for index, document in enumerate(documents):
        assert isinstance(document, dict), f"{path.name} document {index} is a {type(document).__name__}, not a mapping"
    return documents


@functools.cache
def manifests() -> dict[str, list[dict]]:
    return {name: load_documents(KUBERAY_DIR / name) for name in MANIFEST_FILES}


def one(kind: str, file_name: str | None = None) -> dict:
    found = [document for name, documents in manifests().items() if file_name in (None, name)
             for document in documents if document.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {file_name or 'deploy/kuberay'}, found {len(found)}"
    return found[0]


def ray_resources() -> list[tuple[str, dict]]:
    return [(name, document) for name, documents in manifests().items() for document in documents
            if document.get("kind") in CRD_FILES]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of the standalone cluster and of the RayJob's own cluster."""
    return [("raycluster.yaml", one("RayCluster")["spec"]),
            ("rayjob.yaml rayClusterSpec", one("RayJob")["spec"]["rayClusterSpec"])]


def ray_pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of the head and every worker group of a RayCluster spec."""
    groups = [("head", spec["headGroupSpec"]["template"])]
    groups += [(group["groupName"], group["template"]) for group in spec.get("workerGroupSpecs", [])]
    return groups


def all_pod_templates() -> list[tuple[str, dict]]:
    templates = [(f"{where} {group}", template) for where, spec in cluster_specs()
                 for group, template in ray_pod_templates(spec)]
    submitter = one("RayJob")["spec"].get("submitterPodTemplate")
    if submitter:
        templates.append(("rayjob.yaml submitter", submitter))
    return templates


def containers_of(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def version_of_lexica() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no [project] version"
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# Kubernetes structural schema -> JSON Schema
#
# A CRD's openAPIV3Schema is OpenAPI v3.0 (JSON Schema draft 4 semantics) plus Kubernetes
# extensions that plain jsonschema ignores. Ignoring them would let bad manifests through, so:
# - x-kubernetes-int-or-string: the value is an integer or a string (quantities like 8, "500m");
# - x-kubernetes-preserve-unknown-fields: unknown keys are kept; everywhere else the API server
#   (kubectl's default --validate=strict) rejects unknown fields, so objects get
#   additionalProperties: false - a misspelled field is an error, as on a real cluster;
# - nullable: null is accepted only where it says so;
# - x-kubernetes-list-type map/set: list items must be unique by their keys / as a whole;
# - x-kubernetes-validations (CEL): cannot be evaluated here, so a manifest that sets a field
#   guarded by CEL rules is refused with the rules quoted, rather than passed unchecked;
# - format int32/int64: range-checked.
# An extension this translation does not know makes it fail, so a newer CRD cannot slip a rule by.

KNOWN_EXTENSIONS = {"x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
                    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations"}
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# ObjectMeta is not in the CRD (it says only `type: object`); this covers the fields manifests set.
# Names are DNS-1035 labels: KubeRay derives Service and pod names from them.
OBJECT_META = {"type": "object", "required": ["name"], "additionalProperties": False,
               "properties": {"name": {"type": "string", "pattern": DNS_1035_LABEL},
                              "namespace": {"type": "string", "pattern": DNS_1035_LABEL},
                              "labels": STRING_MAP, "annotations": STRING_MAP}}


def kubernetes_to_jsonschema(node: dict) -> dict:
    """Translate one structural-schema node (and its children) into plain JSON Schema."""
    unknown = {key for key in node if key.startswith("x-kubernetes-")} - KNOWN_EXTENSIONS
    if unknown:
        raise NotImplementedError(f"schema extension(s) {sorted(unknown)} are not translated; extend "
                                  "kubernetes_to_jsonschema before trusting this validation")
    translated: dict = {}
    for key, value in node.items():
        if key == "properties":
            translated[key] = {name: kubernetes_to_jsonschema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            translated[key] = kubernetes_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            translated[key] = [kubernetes_to_jsonschema(child) for child in value]
        elif key != "description":
            translated[key] = value
    if node.get("x-kubernetes-int-or-string"):
        translated.pop("type", None)
        translated.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in translated:
        translated["type"] = [translated["type"], "null"]
    is_object = translated.get("type") in ("object", ["object", "null"])
    if is_object and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in translated:
        translated["additionalProperties"] = False
    return translated


def check_list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_properties = schema.get("items", {}).get("properties", {})
        seen = {}
        for index, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            identity = tuple(item.get(key, item_properties.get(key, {}).get("default")) for key in keys)
            if identity in seen:
                yield jsonschema.ValidationError(f"items {seen[identity]} and {index} have the same "
                                                 f"{'/'.join(keys)} {identity}; this list is keyed by it")
            seen.setdefault(identity, index)
    elif list_type == "set":
        encoded = [json.dumps(item, sort_keys=True) for item in instance]
        if len(set(encoded)) != len(encoded):
            yield jsonschema.ValidationError("this list is a set but holds duplicate items")


def refuse_cel_rules(validator, rules, instance, schema):
    quoted = "; ".join(rule["rule"] for rule in rules)
    yield jsonschema.ValidationError(f"this field carries CEL rules this offline check cannot evaluate ({quoted}); "
                                     "leave it unset or check the rules by hand and extend the test")


FORMAT_CHECKER = jsonschema.FormatChecker()


@FORMAT_CHECKER.checks("int32")
def is_int32(value) -> bool:
    return not isinstance(value, int) or -2**31 <= value < 2**31


@FORMAT_CHECKER.checks("int64")
def is_int64(value) -> bool:
    return not isinstance(value, int) or -2**63 <= value < 2**63


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": check_list_type, "x-kubernetes-validations": refuse_cel_rules})


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set LEXICA_KUBERAY_CRDS)")
    with path.open(encoding="utf-8") as handle:
        crd = yaml.load(handle, Loader=YAML_LOADER)
    assert crd["spec"]["names"]["kind"] == kind, f"{path.name} defines {crd['spec']['names']['kind']}, not {kind}"
    # Manifests use the storage version (ray.io/v1); v1alpha1 is deprecated and gets no new fields.
    storage = next(entry for entry in crd["spec"]["versions"] if entry.get("storage"))
    assert storage["served"] and not storage.get("deprecated")
    api_version = f"{crd['spec']['group']}/{storage['name']}"
    schema = kubernetes_to_jsonschema(storage["schema"]["openAPIV3Schema"])
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"enum": [api_version]}
    schema["properties"]["kind"] = {"enum": [kind]}
    schema["properties"]["metadata"] = OBJECT_META
    del schema["properties"]["status"]  # written by the operator; a manifest setting it is a mistake
    return KubernetesValidator(schema, format_checker=FORMAT_CHECKER)


def location(error: jsonschema.ValidationError) -> str:
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(document)"


def schema_errors(document: dict) -> list[str]:
    validator = crd_validator(document["kind"])
    errors = sorted(validator.iter_errors(document), key=lambda error: list(map(str, error.absolute_path)))
    return [f"{location(error)}: {error.message}" for error in errors]


# ---------------------------------------------------------------------------------------------
# Schema validation

def test_every_manifest_parses_and_names_its_kind():
    found = {name: [document["kind"] for document in documents] for name, documents in manifests().items()}
    assert found == {"raycluster.yaml": ["RayCluster"], "rayjob.yaml": ["RayJob"],
                     "configmap.yaml": ["ConfigMap"], "secret.example.yaml": ["Secret"]}
    # Nothing else in the folder pretends to be a manifest that no test reads.
    yaml_files = {path.name for path in KUBERAY_DIR.glob("*.yaml")}
    assert yaml_files == set(MANIFEST_FILES) | {"kustomization.yaml"}


@pytest.mark.parametrize("file_name", ["raycluster.yaml", "rayjob.yaml"])
def test_ray_resources_validate_against_the_crd_schema(file_name):
    for document in manifests()[file_name]:
        assert document["apiVersion"] == "ray.io/v1"
        errors = schema_errors(document)
        assert not errors, f"{file_name} does not match the {document['kind']} CRD:\n" + "\n".join(errors)


def set_path(document: dict, dotted: str, value) -> dict:
    """A copy of ``document`` with the value at ``a.b[0].c`` replaced (or deleted when value is DELETE)."""
    changed = copy.deepcopy(document)
    parts = [int(part) if part.isdigit() else part for part in re.findall(r"[^.\[\]]+", dotted)]
    parent = changed
    for part in parts[:-1]:
        parent = parent[part]
    if value is DELETE:
        del parent[parts[-1]]
    else:
        parent[parts[-1]] = value
    return changed


DELETE = object()
HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers[0]"
GPU_GROUP = "spec.workerGroupSpecs[0]"
GPU_CONTAINER = f"{GPU_GROUP}.template.spec.containers[0]"
BAD_RAYCLUSTERS = {
    # misspelled fields under strict objects, at the top of the spec and deep in the pod spec
    "misspelled group field": (f"{GPU_GROUP}.maxReplica", 4, GPU_GROUP),
    "misspelled container field": (f"{HEAD_CONTAINER}.imagePullPolicyy", "Always", HEAD_CONTAINER),
    "misspelled spec field": ("spec.enableInTreeAutoScaling", True, "spec"),
    "status in a manifest": ("status", {}, "(document)"),
    # wrong types
    "replicas as a string": (f"{GPU_GROUP}.minReplicas", "1", f"{GPU_GROUP}.minReplicas"),
    "rayStartParams value not a string": ("spec.headGroupSpec.rayStartParams.num-cpus", 0,
                                          "spec.headGroupSpec.rayStartParams.num-cpus"),
    "boolean as a string": ("spec.enableInTreeAutoscaling", "true", "spec.enableInTreeAutoscaling"),
    "int32 overflow": (f"{GPU_GROUP}.maxReplicas", 2**40, f"{GPU_GROUP}.maxReplicas"),
    "null where not nullable": (f"{GPU_GROUP}.replicas", None, f"{GPU_GROUP}.replicas"),
    # int-or-string: a float is neither, and a string must be a quantity
    "quantity as a float": (f"{GPU_CONTAINER}.resources.limits.cpu", 7.5, f"{GPU_CONTAINER}.resources.limits.cpu"),
    "quantity that is no quantity": (f"{GPU_CONTAINER}.resources.limits.memory", "lots",
                                     f"{GPU_CONTAINER}.resources.limits.memory"),
    # missing required fields
    "group without groupName": (f"{GPU_GROUP}.groupName", DELETE, GPU_GROUP),
    "container without name": (f"{HEAD_CONTAINER}.name", DELETE, HEAD_CONTAINER),
    "head without template": ("spec.headGroupSpec.template", DELETE, "spec.headGroupSpec"),
    # enums, keyed lists, CEL-guarded fields, metadata
    "unknown upscaling mode": ("spec.autoscalerOptions.upscalingMode", "Fast", "spec.autoscalerOptions.upscalingMode"),
    "duplicate volume names": ("spec.headGroupSpec.template.spec.volumes[1].name", "pipeline-config",
                               "spec.headGroupSpec.template.spec.volumes"),
    "CEL-guarded field": ("spec.managedBy", "ray.io/kuberay-operator", "spec.managedBy"),
    "invalid name": ("metadata.name", "Lexica_Cluster", "metadata.name"),
    "wrong apiVersion": ("apiVersion", "ray.io/v1alpha1", "apiVersion"),
}


@pytest.mark.parametrize("case", sorted(BAD_RAYCLUSTERS))
def test_validation_rejects_a_known_bad_raycluster(case):
    dotted, value, expected_location = BAD_RAYCLUSTERS[case]
    errors = schema_errors(set_path(one("RayCluster"), dotted, value))
    assert errors, f"{case}: the schema accepted it"
    assert any(error.startswith(expected_location + ":") for error in errors), \
        f"{case}: expected an error at {expected_location}, got:\n" + "\n".join(errors)


def test_validation_rejects_a_known_bad_rayjob():
    job = one("RayJob")
    bad = {"spec.shutdownAfterJobFinish": True,  # misspelled
           "spec.ttlSecondsAfterFinished": "900",  # wrong type
           "spec.deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}},  # CEL-guarded
           "spec.submitterConfig.backoffLimit": 1.5,
           "spec.rayClusterSpec.workerGroupSpecs[1].template.spec.containers[0].envFrom[0].secretRef.nam": "x"}
    for dotted, value in bad.items():
        assert schema_errors(set_path(job, dotted, value)), f"the RayJob schema accepted {dotted} = {value!r}"


@pytest.mark.parametrize("quantity", [8, "8", "500m", "48Gi", "1e3"])
def test_int_or_string_quantities_accept_integers_and_strings(quantity):
    document = set_path(one("RayCluster"), f"{GPU_CONTAINER}.resources.limits.cpu", quantity)
    assert not schema_errors(document)


def test_translation_of_kubernetes_extensions():
    schema = kubernetes_to_jsonschema({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "maybe": {"type": "string", "nullable": True},
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            "empty": {"type": "object"},
        },
    })
    validator = KubernetesValidator(schema, format_checker=FORMAT_CHECKER)
    assert validator.is_valid({"port": 80, "free": {"anything": [1]}, "maybe": None, "tags": ["a", "b"]})
    assert validator.is_valid({"port": "http"})
    for bad in ({"port": 1.5}, {"port": None}, {"extra": 1}, {"tags": ["a", "a"]}, {"empty": {"x": 1}},
                {"maybe": 3}):
        assert not validator.is_valid(bad), bad
    with pytest.raises(NotImplementedError, match="x-kubernetes-embedded-resource"):
        kubernetes_to_jsonschema({"type": "object", "x-kubernetes-embedded-resource": True})


# Kubernetes core objects: no schema here, so a minimal shape of the fields these files use.
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
CORE_SCHEMAS = {
    "ConfigMap": {"type": "object", "additionalProperties": False,
                  "required": ["apiVersion", "kind", "metadata", "data"],
                  "properties": {"apiVersion": {"enum": ["v1"]}, "kind": {"enum": ["ConfigMap"]},
                                 "metadata": OBJECT_META, "immutable": {"type": "boolean"},
                                 "data": {"type": "object", "additionalProperties": {"type": "string"},
                                          "propertyNames": {"pattern": CONFIG_KEY}}}},
    "Secret": {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "type"],
               "properties": {"apiVersion": {"enum": ["v1"]}, "kind": {"enum": ["Secret"]}, "metadata": OBJECT_META,
                              "type": {"enum": ["Opaque"]},
                              "stringData": {"type": "object", "additionalProperties": {"type": "string"},
                                             "propertyNames": {"pattern": CONFIG_KEY}}}},
}


@pytest.mark.parametrize("kind", sorted(CORE_SCHEMAS))
def test_core_objects_have_their_basic_shape(kind):
    document = one(kind)
    errors = [f"{location(error)}: {error.message}"
              for error in jsonschema.Draft4Validator(CORE_SCHEMAS[kind]).iter_errors(document)]
    assert not errors, f"{kind}:\n" + "\n".join(errors)
    assert len(json.dumps(document).encode()) < 1024 * 1024, f"{kind} exceeds the API server's 1 MiB object limit"
    assert not jsonschema.Draft4Validator(CORE_SCHEMAS[kind]).is_valid(set_path(document, "metadata.nam", "x"))


# ---------------------------------------------------------------------------------------------
# Invariants across files

def test_rayjob_runs_the_same_cluster_as_the_raycluster():
    assert one("RayJob")["spec"]["rayClusterSpec"] == one("RayCluster")["spec"], \
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec; keep them identical"


def test_images_are_the_documented_docker_tags():
    version = version_of_lexica()
    for where, spec in cluster_specs():
        assert "image" not in spec.get("autoscalerOptions", {}), "the autoscaler should run the head's image"
        for group, template in ray_pod_templates(spec):
            variant = "cuda" if group_gpus(template) else "cpu"
            for container in containers_of(template):
                assert container["image"] == f"{IMAGE_REPOSITORY}:{version}-{variant}", \
                    f"{where} {group} container {container['name']} runs {container['image']}"
    for container in containers_of(one("RayJob")["spec"]["submitterPodTemplate"]):
        assert container["image"] == f"{IMAGE_REPOSITORY}:{version}-cpu"


def docker_files() -> list[Path]:
    assert sorted(DOCKER_DIR.glob("Dockerfile*")), "docker/ has no Dockerfile: the manifests name its images"
    return sorted(path for path in DOCKER_DIR.rglob("*") if path.is_file())


def test_docker_documents_the_image_tags():
    text = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in docker_files())
    version = version_of_lexica()
    for variant in ("cpu", "cuda"):
        assert f"lexica:{version}-{variant}" in text, f"docker/ never names the tag lexica:{version}-{variant}"
    for reference in set(re.findall(r"[\w.\-/]+/lexica(?=:)", text)):
        assert reference == IMAGE_REPOSITORY, f"docker/ names the image {reference}, the manifests {IMAGE_REPOSITORY}"


def dockerfile_user(path: Path) -> tuple[int, int | None]:
    """(uid, gid or None) of the image's last USER line."""
    text = path.read_text(encoding="utf-8")
    users = re.findall(r"^\s*USER\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
    assert users, f"{path.name} has no USER line, so its containers would run as root"
    user, _, group = users[-1].partition(":")
    if user == "ray":
        user, group = "1000", group or "100"  # the official Ray images' user
    assert user.isdigit(), f"{path.name} runs as {user!r}, whose uid this test cannot tell; use a numeric USER"
    return int(user), int(group) if group.isdigit() else None


def test_pods_run_as_the_images_user():
    dockerfiles = {variant: DOCKER_DIR / f"Dockerfile.{variant}" for variant in ("cpu", "cuda")}
    docker_files()
    for where, template in all_pod_templates():
        for container in containers_of(template):
            uid, gid = dockerfile_user(dockerfiles[container["image"].rsplit("-", 1)[-1]])
            context = {**template["spec"].get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsUser") == uid, \
                f"{where} {container['name']} runs as uid {context.get('runAsUser')}, its image as {uid}"
            assert gid is None or context.get("runAsGroup") == gid, \
                f"{where} {container['name']} runs as gid {context.get('runAsGroup')}, its image as {gid}"


def test_every_container_runs_as_non_root():
    for where, template in all_pod_templates():
        pod_context = template["spec"].get("securityContext", {})
        for container in containers_of(template):
            context = {**pod_context, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, f"{where} {container['name']} may run as root"
            assert context.get("runAsUser", 0) > 0, f"{where} {container['name']} sets no non-zero runAsUser"
            assert context.get("allowPrivilegeEscalation") is False, f"{where} {container['name']} may escalate"
            assert not context.get("privileged"), f"{where} {container['name']} is privileged"
    for where, spec in cluster_specs():
        autoscaler = spec["autoscalerOptions"]["securityContext"]
        assert autoscaler["runAsNonRoot"] is True and autoscaler["runAsUser"] > 0, \
            f"{where}: the autoscaler may run as root"


def group_gpus(template: dict) -> int:
    return sum(int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for container in template["spec"]["containers"])


def test_head_is_cpu_only_and_workers_autoscale():
    for where, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert group_gpus(head["template"]) == 0, f"{where}: the head requests GPUs"
        assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head would run tasks"
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"], f"{where}: no autoscaler"
        groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
        gpu_groups = [group for group in groups.values() if group_gpus(group["template"])]
        assert len(gpu_groups) == 1 and len(groups) == 2, f"{where}: expected one GPU and one CPU worker group"
        for group in groups.values():
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], \
                f"{where} {group['groupName']}: replicas outside minReplicas..maxReplicas"
            assert group["maxReplicas"] >= 1
        for container in gpu_groups[0]["template"]["spec"]["containers"]:
            requests = container["resources"].get("requests", {})
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
            assert requests.get("nvidia.com/gpu", container["resources"]["limits"]["nvidia.com/gpu"]) == \
                container["resources"]["limits"]["nvidia.com/gpu"], "GPU requests must equal limits"


def test_pipeline_config_loads_with_lexicas_own_loaders(tmp_path):
    pipeline_text = one("ConfigMap")["data"]["pipeline.yaml"]
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(pipeline_text, encoding="utf-8")
    harvest = harvest_config_from_file(str(config_path)).validate()
    train = from_dict(TrainConfig, stage_section(str(config_path), "train"), "train").validate(SMOLLM2_D_MODEL)
    analysis = from_dict(AnalysisConfig, stage_section(str(config_path), "analysis"), "analysis").validate()

    assert harvest.run.startswith("s3://") and harvest.run == train.run == analysis.run
    assert all(path.startswith("s3://") for path in harvest.corpus.paths), "pods share nothing but object storage"
    assert not harvest.model.path.startswith(("/", ".", "assets/")), "a local model folder is not in the image"
    assert harvest.model.dtype == "bfloat16"
    assert harvest.batch_tokens > 4096 and train.batch_size > 2048, "GPU settings should exceed the CPU demo's"
    credential_words = ("key", "secret", "token", "password")
    for options in (harvest.storage_options, train.storage_options, analysis.storage_options):
        assert not any(word in name.lower() for name in options for word in credential_words)
    # Resource fit: harvest asks for GPUs explicitly, and train's workers are GPUs that are always up.
    for where, spec in cluster_specs():
        gpu_group = next(group for group in spec["workerGroupSpecs"] if group_gpus(group["template"]))
        gpu_capacity = gpu_group["maxReplicas"] * group_gpus(gpu_group["template"])
        gpus_wanted = harvest.workers.actors * (harvest.workers.gpus_per_actor or 0)
        assert 0 < gpus_wanted <= gpu_capacity, \
            f"{where}: harvest wants {gpus_wanted} GPUs, the GPU group has at most {gpu_capacity}"
        assert max(1, train.workers) <= gpu_group["minReplicas"] * group_gpus(gpu_group["template"]), \
            f"{where}: train uses GPUs only if {train.workers} are present when it starts (train/job.py)"


def test_entrypoint_reads_the_mounted_config():
    job = one("RayJob")["spec"]
    assert job["entrypoint"].startswith("lexica pipeline --config ")
    config_path = job["entrypoint"].split("--config ", 1)[1].split()[0]
    configmap = one("ConfigMap")
    for where, spec in cluster_specs():
        for group, template in ray_pod_templates(spec):
            volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
            mounted = []
            for mount in template["spec"]["containers"][0]["volumeMounts"]:
                source = volumes[mount["name"]].get("configMap")
                if source and source["name"] == configmap["metadata"]["name"]:
                    for item in source["items"]:
                        assert item["key"] in configmap["data"], f"{where} {group} mounts a missing key {item['key']}"
                        mounted.append(f"{mount['mountPath'].rstrip('/')}/{item['path']}")
            assert config_path in mounted, f"{where} {group} does not mount {config_path} (mounts {mounted})"


def test_pod_semantics_the_crd_schema_does_not_carry():
    for where, template in all_pod_templates():
        spec = template["spec"]
        volumes = {volume["name"] for volume in spec.get("volumes", [])}
        for container in containers_of(template):
            name = container["name"]
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name), f"{where}: {name!r} is no DNS label"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where} {name} mounts undeclared volume {mount['name']}"
            requests = container.get("resources", {}).get("requests", {})
            limits = container.get("resources", {}).get("limits", {})
            assert {"cpu", "memory"} <= set(limits), f"{where} {name} has no cpu/memory limits"
            for resource, requested in requests.items():
                if resource in limits:
                    assert quantity(requested) <= quantity(limits[resource]), \
                        f"{where} {name}: {resource} request {requested} exceeds its limit {limits[resource]}"
    submitter = one("RayJob")["spec"]["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] in ("Never", "OnFailure"), "a Job's pods may not restart Always"


QUANTITY_SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                     "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in QUANTITY_SUFFIXES, f"quantity {value!r} not understood by this test"
    return float(match.group(1)) * QUANTITY_SUFFIXES[match.group(2)]


def test_quantity_parser():
    assert quantity("500m") == 0.5 and quantity(8) == 8 and quantity("16Gi") == 16 * 2**30
    assert quantity("48Gi") > quantity("32Gi") > quantity("1000M")


# ---------------------------------------------------------------------------------------------
# Credentials

AWS_CREDENTIAL_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
PLACEHOLDER = "REPLACE_ME"


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from walk(child)


def test_s3_credentials_come_only_from_the_secret():
    secret_name = one("Secret")["metadata"]["name"]
    for where, spec in cluster_specs():
        for group, template in ray_pod_templates(spec):
            for container in template["spec"]["containers"]:
                from_secret = {ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref}
                by_key = {entry["name"] for entry in container.get("env", [])
                          if entry.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret_name}
                assert secret_name in from_secret or {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= by_key, \
                    f"{where} {group} container {container['name']} gets no S3 credentials from Secret {secret_name}"
    for name, documents in manifests().items():
        if name == "secret.example.yaml":
            continue
        for node in walk(documents):
            if isinstance(node, dict) and node.get("name") in AWS_CREDENTIAL_NAMES:
                assert "value" not in node, f"{name} sets {node['name']} literally; use the Secret"


def test_secret_template_holds_placeholders_only():
    secret = one("Secret")
    assert "data" not in secret, "base64 data in the template would be a real value"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert all(value == PLACEHOLDER for value in secret["stringData"].values())
    assert "kubectl create secret generic" in (KUBERAY_DIR / "secret.example.yaml").read_text()


def test_no_literal_aws_credentials_anywhere_in_deploy():
    key_id = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
    assignment = re.compile(r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token)\s*[:=]\s*['\"]?"
                            r"([^\s'\"#,}]+)")
    allowed = {PLACEHOLDER, '"$AWS_ACCESS_KEY_ID"', '"$AWS_SECRET_ACCESS_KEY"'}
    for path in sorted((ROOT / "deploy").rglob("*")):
        if not path.is_file() or path.suffix in (".pyc",):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not key_id.search(text), f"{path.relative_to(ROOT)} holds what looks like an AWS access key id"
        for match in assignment.finditer(text):
            value = match.group(2)
            assert value in allowed or value.startswith(("$", "os.environ", "environ", "<")) or \
                re.fullmatch(r"[A-Z_]+", value), f"{path.relative_to(ROOT)} assigns {match.group(1)} a literal"


# ---------------------------------------------------------------------------------------------
# kustomize

def test_kustomization_builds_the_job_and_its_config():
    kustomization = load_documents(KUBERAY_DIR / "kustomization.yaml")[0]
    assert kustomization["resources"] == ["configmap.yaml", "rayjob.yaml"]
    assert all(image["name"] == IMAGE_REPOSITORY for image in kustomization.get("images", []))
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: `kubectl kustomize` not run")
    built = subprocess.run([kubectl, "kustomize", str(KUBERAY_DIR)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    documents = [document for document in yaml.safe_load_all(built.stdout) if document]
    assert sorted(document["kind"] for document in documents) == ["ConfigMap", "RayJob"]
    job = next(document for document in documents if document["kind"] == "RayJob")
    assert job == one("RayJob"), "kustomize changed the RayJob beyond what kustomization.yaml says"
