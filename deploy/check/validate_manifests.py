"""Validate rendered Kubernetes manifests for scripts/check-deploy.sh, in .venv-deploy.

Each positional argument is the output of one `kubectl kustomize` run, and its file name
without ".yaml" names the build in messages. Every object is checked against the
Kubernetes JSON schemas of kubernetes-validate in strict mode (unknown fields are errors),
once per --kubernetes-version. Kinds that kubernetes-validate has no schema for are
checked against a schema in schemas/ when SHIPPED_SCHEMAS lists one. Any other unknown
kind is an error.

On top of the schemas, it checks that:
  * every namespaced object sets metadata.namespace, because the manifests must not
    depend on the namespace of kubectl's current context.
  * every Deployment container started with `--config FILE` (coldgate) reads FILE from
    a ConfigMap of the build, has a preStop sleep of at least the file's drain_delay,
    and a terminationGracePeriodSeconds above preStop + drain_delay + shutdown_grace.
  * each --adapter-config file matches schemas/prometheus-adapter-config.json, and a
    rule of these files serves every HPA External metric.

Exit status: 0 when every check passed, 1 when one failed, 2 on invalid arguments.
"""

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

# (apiVersion, kind) -> schema file in SCHEMA_DIR, for kinds that kubernetes-validate
# does not know.
SHIPPED_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}
ADAPTER_CONFIG_SCHEMA = "prometheus-adapter-config.json"

# Kinds without a namespace. Every other kind must set metadata.namespace.
CLUSTER_SCOPED_KINDS = {
    "APIService",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "Namespace",
    "PersistentVolume",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
    "ValidatingWebhookConfiguration",
}

# coldgate's defaults for [server] drain_delay and shutdown_grace, in seconds.
DEFAULT_DRAIN_DELAY = 5.0
DEFAULT_SHUTDOWN_GRACE = 60.0
# Kubernetes' terminationGracePeriodSeconds when a pod spec sets none.
DEFAULT_TERMINATION_GRACE = 30

DURATION_PART = re.compile(r"(\d+)(ms|s|m|h)")
DURATION_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def describe(doc):
    """Return "Kind namespace/name", or "Kind name" for a cluster-scoped object."""
    metadata = doc.get("metadata") or {}
    kind = doc.get("kind", "<no kind>")
    name = metadata.get("name", "<no name>")
    namespace = metadata.get("namespace")
    if namespace:
        return f"{kind} {namespace}/{name}"
    return f"{kind} {name}"


def format_path(path):
    return ".".join(str(part) for part in path) or "(top level)"


def load_documents(path):
    """Parse every non-empty YAML document of path. Raises ValueError on invalid YAML."""
    try:
        with open(path, encoding="utf-8") as stream:
            return [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {error}") from error


def check_object_shape(doc):
    """Return errors for a document that is not an object with apiVersion, kind and name."""
    if not isinstance(doc, dict):
        return [f"a document is a {type(doc).__name__}, not a Kubernetes object"]
    missing = [key for key in ("apiVersion", "kind") if not isinstance(doc.get(key), str)]
    if not isinstance((doc.get("metadata") or {}).get("name"), str):
        missing.append("metadata.name")
    if missing:
        return [f"{describe(doc)}: missing {', '.join(missing)}"]
    return []


def validate_with_kubernetes_schemas(doc, versions):
    """Validate doc against kubernetes-validate's strict schemas of each version."""
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(
                f"{describe(doc)}: invalid for Kubernetes {version} at "
                f"{format_path(error.path)}: {error.message}"
            )
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{describe(doc)}: kubernetes-validate has no schema for kind {doc['kind']} "
                f"(apiVersion {doc['apiVersion']}) in Kubernetes {version}. Add a JSON schema "
                f"for it to {SCHEMA_DIR} and list it in SHIPPED_SCHEMAS in {Path(__file__).name}."
            )
    return errors


def validate_with_schema_file(instance, schema_file, label):
    """Validate instance against a JSON schema in SCHEMA_DIR and return every error."""
    with open(SCHEMA_DIR / schema_file, encoding="utf-8") as stream:
        schema = json.load(stream)
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{label}: invalid against {schema_file} at {format_path(error.path)}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda error: [str(part) for part in error.path])
    ]


def check_namespaces(docs):
    """Return errors for namespaced objects without metadata.namespace."""
    errors = []
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED_KINDS and not doc["metadata"].get("namespace"):
            errors.append(
                f"{describe(doc)}: metadata.namespace is missing, so kubectl would create it in "
                "the current context's namespace. Set the namespace in the manifest."
            )
    return errors


def parse_duration(text):
    """Parse a coldgate duration such as "5s" or "1m30s" into seconds."""
    if not isinstance(text, str) or not re.fullmatch(r"(\d+(ms|s|m|h))+", text):
        raise ValueError(f"invalid duration {text!r}: expected an integer followed by ms, s, m or h")
    return sum(int(number) * DURATION_UNIT_SECONDS[unit] for number, unit in DURATION_PART.findall(text))


def read_coldgate_config(pod_spec, container, config_maps):
    """Return the text of the file that container passes to `--config`.

    The file must come from a ConfigMap volume of this build, mounted at the file's
    folder, with the file name as the ConfigMap key. Raises ValueError otherwise.
    """
    args = container.get("args", [])
    position = args.index("--config")
    if position + 1 == len(args):
        raise ValueError("--config is the last argument and names no file")
    config_path = PurePosixPath(args[position + 1])
    mounts = container.get("volumeMounts", [])
    mount = next((mount for mount in mounts if PurePosixPath(mount["mountPath"]) == config_path.parent), None)
    if mount is None:
        raise ValueError(f"no volume is mounted at {config_path.parent}, the folder of --config {config_path}")
    volume = next((volume for volume in pod_spec.get("volumes", []) if volume["name"] == mount["name"]), {})
    map_name = (volume.get("configMap") or {}).get("name")
    if map_name is None:
        raise ValueError(f"volume {mount['name']} at {config_path.parent} is not a ConfigMap volume")
    if map_name not in config_maps:
        raise ValueError(f"ConfigMap {map_name} of volume {mount['name']} is not part of the build")
    data = config_maps[map_name].get("data") or {}
    if config_path.name not in data:
        raise ValueError(f"ConfigMap {map_name} has no key {config_path.name!r} for --config {config_path}")
    return data[config_path.name]


def read_drain_settings(config_text):
    """Return (drain_delay, shutdown_grace) in seconds from a coldgate.toml text."""
    server = tomllib.loads(config_text).get("server", {})
    drain_delay = DEFAULT_DRAIN_DELAY
    shutdown_grace = DEFAULT_SHUTDOWN_GRACE
    if "drain_delay" in server:
        drain_delay = parse_duration(server["drain_delay"])
    if "shutdown_grace" in server:
        shutdown_grace = parse_duration(server["shutdown_grace"])
    return drain_delay, shutdown_grace


def check_container_timing(label, pod_spec, container, drain_delay, shutdown_grace):
    """Return (errors, note) for one coldgate container's shutdown settings."""
    sleep = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep")
    if not sleep:
        return [
            f"{label}: lifecycle.preStop.sleep is missing. It must last at least drain_delay "
            f"({drain_delay:g} s), the time the pod needs to leave the EndpointSlices."
        ], None
    pre_stop = sleep.get("seconds")
    if not isinstance(pre_stop, int):
        return [f"{label}: lifecycle.preStop.sleep.seconds is {pre_stop!r}, not an integer"], None

    grace = pod_spec.get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE)
    needed = pre_stop + drain_delay + shutdown_grace
    errors = []
    if pre_stop < drain_delay:
        errors.append(
            f"{label}: preStop sleep of {pre_stop} s is shorter than drain_delay ({drain_delay:g} s). "
            "Raise lifecycle.preStop.sleep.seconds."
        )
    if grace <= needed:
        errors.append(
            f"{label}: terminationGracePeriodSeconds is {grace}, but preStop {pre_stop} s + drain_delay "
            f"{drain_delay:g} s + shutdown_grace {shutdown_grace:g} s = {needed:g} s leaves no margin. "
            "Raise terminationGracePeriodSeconds above that sum."
        )
    if errors:
        return errors, None

    note = (
        f"{label}: terminationGracePeriodSeconds {grace} > preStop {pre_stop} + drain_delay "
        f"{drain_delay:g} + shutdown_grace {shutdown_grace:g} = {needed:g} (margin {grace - needed:g} s)"
    )
    return [], note


def check_shutdown_timing(docs):
    """Check the shutdown settings of every Deployment container started with `--config`.

    Returns (errors, notes). A note states the arithmetic of a container that passed.
    """
    errors, notes = [], []
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        namespace = doc["metadata"].get("namespace")
        config_maps = {
            other["metadata"]["name"]: other
            for other in docs
            if other["kind"] == "ConfigMap" and other["metadata"].get("namespace") == namespace
        }
        pod_spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod_spec.get("containers", []):
            if "--config" not in container.get("args", []):
                continue
            label = f"{describe(doc)} container {container['name']}"
            try:
                config_text = read_coldgate_config(pod_spec, container, config_maps)
                drain_delay, shutdown_grace = read_drain_settings(config_text)
            except (tomllib.TOMLDecodeError, ValueError) as error:
                errors.append(f"{label}: cannot read the drain settings of its configuration: {error}")
                continue
            container_errors, note = check_container_timing(
                label, pod_spec, container, drain_delay, shutdown_grace
            )
            errors += container_errors
            if note:
                notes.append(note)
    return errors, notes


def check_adapter_config(path):
    """Validate a prometheus-adapter config file and return (errors, served metric names)."""
    try:
        docs = load_documents(path)
    except ValueError as error:
        return [str(error)], set()
    if len(docs) != 1:
        return [f"{path}: expected one YAML document, found {len(docs)}"], set()
    config = docs[0]
    errors = validate_with_schema_file(config, ADAPTER_CONFIG_SCHEMA, str(path))
    if errors:
        return errors, set()
    return [], {rule["name"]["as"] for rule in config.get("externalRules", [])}


def check_external_metrics(docs, served_metrics):
    """Return errors for HPA External metrics that no adapter rule serves."""
    errors = []
    for doc in docs:
        if doc["kind"] != "HorizontalPodAutoscaler":
            continue
        for metric in doc.get("spec", {}).get("metrics", []):
            if metric.get("type") != "External":
                continue
            name = ((metric.get("external") or {}).get("metric") or {}).get("name")
            if name not in served_metrics:
                served = ", ".join(sorted(served_metrics)) or "nothing"
                errors.append(
                    f"{describe(doc)}: External metric {name!r} is not served by any rule of the "
                    f"adapter configuration (its rules serve: {served})"
                )
    return errors


def check_build(path, versions, served_metrics, check_metrics):
    """Run every check on one rendered build and return (object count, errors, notes)."""
    try:
        docs = load_documents(path)
    except ValueError as error:
        return 0, [str(error)], []
    if not docs:
        return 0, [f"{path}: the build rendered no objects"], []

    errors = [message for doc in docs for message in check_object_shape(doc)]
    if errors:
        return len(docs), errors, []

    notes = []
    for doc in docs:
        schema_file = SHIPPED_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema_file:
            errors += validate_with_schema_file(doc, schema_file, describe(doc))
            notes.append(
                f"{describe(doc)}: kubernetes-validate has no schema for it, so it was "
                f"checked against schemas/{schema_file}"
            )
        else:
            errors += validate_with_kubernetes_schemas(doc, versions)
    errors += check_namespaces(docs)
    timing_errors, timing_notes = check_shutdown_timing(docs)
    errors += timing_errors
    notes += timing_notes
    if check_metrics:
        errors += check_external_metrics(docs, served_metrics)
    return len(docs), errors, notes


def check_versions(versions):
    """Return an error message for a version that kubernetes-validate has no schemas for."""
    known = [tuple(int(part) for part in version.split(".")[:2]) for version in all_versions()]
    for version in versions:
        match = re.fullmatch(r"v?(\d+)\.(\d+)(\.\d+)?", version)
        if not match or not known[0] <= (int(match[1]), int(match[2])) <= known[-1]:
            return (
                f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes "
                f"{version!r}. Pass versions from {all_versions()[0]} to {all_versions()[-1]}, such as 1.30."
            )
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kubernetes-version",
        action="append",
        required=True,
        help="Kubernetes version (such as 1.30) whose schemas every object must match. Repeat for several.",
    )
    parser.add_argument(
        "--adapter-config",
        action="append",
        default=[],
        type=Path,
        help="prometheus-adapter config file to validate. Every HPA External metric must be "
        "served by a rule of these files.",
    )
    parser.add_argument("builds", nargs="+", type=Path, help="output file of one `kubectl kustomize` run")
    args = parser.parse_args()
    version_error = check_versions(args.kubernetes_version)
    if version_error:
        print(version_error, file=sys.stderr)
        return 2

    failed = False
    adapter_config_failed = False
    served_metrics = set()
    for path in args.adapter_config:
        errors, names = check_adapter_config(path)
        served_metrics |= names
        for message in errors:
            print(f"FAIL {message}")
        if errors:
            failed = True
            adapter_config_failed = True
        else:
            print(f"ok   {path}: serves External metrics {', '.join(sorted(names))}")

    # An invalid adapter configuration is reported above, and matching HPAs against its
    # rules would only repeat that failure.
    check_metrics = bool(args.adapter_config) and not adapter_config_failed
    for path in args.builds:
        build = path.name.removesuffix(".yaml")
        count, errors, notes = check_build(path, args.kubernetes_version, served_metrics, check_metrics)
        for message in errors:
            print(f"FAIL {build}: {message}")
        if errors:
            failed = True
            continue
        print(f"ok   {build}: {count} objects valid for Kubernetes {', '.join(args.kubernetes_version)}")
        for note in notes:
            print(f"       {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
