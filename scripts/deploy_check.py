#!/usr/bin/env python3
"""Checks Encore's Kubernetes manifests offline; scripts/deploy-check.sh runs it.

For the kustomize base and each overlay it renders the manifests with
`kubectl kustomize` and then checks every object they hold:

  schemas     every built-in object against the Kubernetes API's JSON
              schemas, strictly (unknown fields are errors), for the oldest
              and the newest Kubernetes version Encore supports
              (kubernetes-validate); custom resources (the ServiceMonitor)
              against their CRD's schema (scripts/crd_validate.mjs);
  references  what the schemas cannot see: Services, PodDisruptionBudgets,
              NetworkPolicies and HPAs select or name workloads that exist;
              named ports, volumes, ConfigMaps, Secrets and claims exist;
  contract    every container has probes where it serves, requests and
              limits, and the restricted Pod Security settings; every Encore
              process has the labels, annotation and `admin` port the
              scrape configuration keeps; encore.toml's ports match the
              containers'; grace periods exceed the processes' shutdown
              grace; Redis persists with AOF and requires the password the
              coordinator's store URI carries; the gpu overlay requests GPUs.

Last, it feeds the same checks deliberately broken copies of the rendered
manifests and fails unless each one is caught, so that a check that has
quietly stopped checking shows up.
"""

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError

# The oldest Kubernetes release whose API the manifests must fit (autoscaling/v2,
# policy/v1 and the restricted Pod Security labels are all older), and the
# newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")

# Custom resources and the validator that knows their schema.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# Encore's processes, by app.kubernetes.io/component, with the section of
# encore.toml each reads.
ROLES = {
    "coordinator": "coordinator",
    "reward-server": "reward_server",
    "actor": "actor",
    "learner": "learner",
}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

NAMESPACE = "encore"

DASHBOARD = "deploy/grafana/dashboards/encore.json"
SCRAPE_CONFIG = "deploy/prometheus/prometheus.yml"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

# What each target must render, beyond the base. Secrets named in
# `external_secrets` are created by the operator, not by kustomize.
TARGETS = {
    "base": {
        "path": "deploy/kubernetes/base",
        "external_secrets": {"encore-tokens"},
        "gpu": False,
    },
    "cpu-demo": {
        "path": "deploy/kubernetes/overlays/cpu-demo",
        "external_secrets": set(),
        "gpu": False,
    },
    "gpu": {
        "path": "deploy/kubernetes/overlays/gpu",
        "external_secrets": {"encore-tokens"},
        "gpu": True,
    },
}


def render(kustomize, path):
    """The objects `kustomize build` makes of the kustomization at path."""
    out = subprocess.run(
        kustomize + [str(path)], check=False, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise SystemExit(f"kustomize failed for {path}:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --- schemas ---------------------------------------------------------------------


def schema_errors(objects, crd_validator):
    """Errors of every object against the API schemas (and CRD schemas)."""
    errors = []
    custom = []
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_KINDS:
            custom.append(obj)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                errors.append(f"{name_of(obj)}: Kubernetes {version}: {path}: {e.message}")
            except SchemaNotFoundError:
                errors.append(
                    f"{name_of(obj)}: no schema for {key[0]} {key[1]} in Kubernetes {version} "
                    "(a typo in apiVersion or kind, or a custom resource without a validator)"
                )
    if custom:
        errors += crd_validator(custom)
    return errors


def node_crd_validator(node, script, modules):
    """Validates custom resources with scripts/crd_validate.mjs."""

    def validate(objects):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(objects, f)
        out = subprocess.run(
            [node, str(script), str(modules), f.name],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        Path(f.name).unlink()
        if out.returncode not in (0, 1):
            raise SystemExit(f"crd_validate.mjs failed to run:\n{out.stdout}{out.stderr}")
        return [line for line in out.stdout.splitlines() if line.strip()]

    return validate


# --- references and contract ----------------------------------------------------------


def selects(selector, labels):
    """Whether a label selector (matchLabels and matchExpressions) selects labels."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        # A Service's selector is a plain map.
        selector = {"matchLabels": selector}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_template(obj):
    if obj.get("kind") not in WORKLOAD_KINDS:
        return None
    return obj["spec"]["template"]


def container_ports(pod_spec):
    ports = {}
    for c in pod_spec.get("containers", []):
        for p in c.get("ports", []):
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
            ports[str(p["containerPort"])] = p["containerPort"]
    return ports


def port_exists(port, ports):
    return str(port) in ports


def encore_config(objects):
    """encore.toml from the encore-config ConfigMap, parsed, or None."""
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"].startswith("encore-config"):
            return tomllib.loads(obj["data"]["encore.toml"])
    return None


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


def reference_errors(objects, target):
    errors = []
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    workloads = [o for o in objects if pod_template(o) is not None]
    pods = [(o, pod_template(o)) for o in workloads]

    def pods_selected(selector):
        return [
            (w, t) for w, t in pods if selects(selector, t["metadata"].get("labels", {}))
        ]

    # Everything namespaced lands in Encore's namespace: an object an
    # overlay adds without it would go to `default`, and references to it
    # from the base would not be renamed with its hash suffix.
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED and obj["metadata"].get("namespace") != NAMESPACE:
            errors.append(
                f"{name_of(obj)}: in namespace {obj['metadata'].get('namespace')!r}, not {NAMESPACE!r}"
            )

    # Services: select a workload, and their target ports exist there.
    for svc in by_kind.get("Service", {}).values():
        selected = pods_selected(svc["spec"].get("selector"))
        if not selected:
            errors.append(f"{name_of(svc)}: its selector matches no pod template")
        for port in svc["spec"].get("ports", []):
            target_port = port.get("targetPort", port["port"])
            for w, t in selected:
                if not port_exists(target_port, container_ports(t["spec"])):
                    errors.append(
                        f"{name_of(svc)}: port {port.get('name')} targets {target_port!r}, "
                        f"which {name_of(w)} does not expose"
                    )
    # StatefulSets name an existing headless Service.
    for sts in by_kind.get("StatefulSet", {}).values():
        svc = by_kind.get("Service", {}).get(sts["spec"].get("serviceName"))
        if svc is None:
            errors.append(f"{name_of(sts)}: serviceName {sts['spec'].get('serviceName')!r} does not exist")
        elif svc["spec"].get("clusterIP") != "None":
            errors.append(f"{name_of(sts)}: its Service {name_of(svc)} is not headless")
    # PodDisruptionBudgets and NetworkPolicies select workloads; policy ports
    # exist on the pods they protect.
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        if not pods_selected(pdb["spec"].get("selector")):
            errors.append(f"{name_of(pdb)}: its selector matches no pod template")
    for policy in by_kind.get("NetworkPolicy", {}).values():
        selector = policy["spec"].get("podSelector") or {}
        selected = pods if selector == {} else pods_selected(selector)
        if not selected:
            errors.append(f"{name_of(policy)}: its podSelector matches no pod template")
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for w, t in selected:
                    if not port_exists(port["port"], container_ports(t["spec"])):
                        errors.append(
                            f"{name_of(policy)}: port {port['port']!r} is not a port of {name_of(w)}"
                        )
            for peer in rule.get("from", []):
                # Peers in this namespace must exist; those in any namespace
                # (namespaceSelector) may be elsewhere.
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    if not pods_selected(peer["podSelector"]):
                        errors.append(
                            f"{name_of(policy)}: a `from` podSelector matches no pod template"
                        )
    # HPAs scale something that exists.
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            errors.append(f"{name_of(hpa)}: scaleTargetRef {ref['kind']}/{ref['name']} does not exist")
    # RoleBindings bind a Role and ServiceAccounts that exist.
    for binding in by_kind.get("RoleBinding", {}).values():
        if binding["roleRef"]["name"] not in by_kind.get(binding["roleRef"]["kind"], {}):
            errors.append(f"{name_of(binding)}: roleRef {binding['roleRef']['name']} does not exist")
        for subject in binding.get("subjects", []):
            if subject["kind"] == "ServiceAccount" and subject["name"] not in by_kind.get("ServiceAccount", {}):
                errors.append(f"{name_of(binding)}: ServiceAccount {subject['name']} does not exist")

    # Pod templates: volumes, probes, resources, security.
    for w, t in pods:
        spec = t["spec"]
        wname = name_of(w)
        sa = spec.get("serviceAccountName")
        if sa and sa not in by_kind.get("ServiceAccount", {}):
            errors.append(f"{wname}: serviceAccountName {sa} does not exist")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_templates = {
            c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])
        }
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                errors.append(f"{wname}: volume {v['name']}: ConfigMap {v['configMap']['name']} does not exist")
            if "secret" in v:
                secret = v["secret"]["secretName"]
                if secret not in by_kind.get("Secret", {}) and secret not in target["external_secrets"]:
                    errors.append(f"{wname}: volume {v['name']}: Secret {secret} does not exist")
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                if claim not in by_kind.get("PersistentVolumeClaim", {}):
                    errors.append(f"{wname}: volume {v['name']}: claim {claim} does not exist")
        pod_security = spec.get("securityContext", {})
        if pod_security.get("runAsNonRoot") is not True:
            errors.append(f"{wname}: securityContext.runAsNonRoot is not true")
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errors.append(f"{wname}: securityContext.seccompProfile is not RuntimeDefault")
        if w["kind"] != "Job" and "terminationGracePeriodSeconds" not in spec:
            errors.append(f"{wname}: no terminationGracePeriodSeconds")
        ports = container_ports(spec)
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            cname = f"{wname} container {c['name']}"
            is_init = c in spec.get("initContainers", [])
            if ":" not in c["image"].rsplit("/", 1)[-1] and "@" not in c["image"]:
                errors.append(f"{cname}: image {c['image']!r} has no tag")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    errors.append(f"{cname}: mounts {m['name']}, which is no volume of the pod")
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in resources.get(kind, {}):
                        errors.append(f"{cname}: no {kind}.{res}")
            sec = c.get("securityContext", {})
            if sec.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{cname}: allowPrivilegeEscalation is not false")
            if sec.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{cname}: readOnlyRootFilesystem is not true")
            if sec.get("capabilities", {}).get("drop") != ["ALL"]:
                errors.append(f"{cname}: capabilities do not drop ALL")
            if c.get("ports") and not is_init and w["kind"] != "Job":
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        errors.append(f"{cname}: no {probe}")
                        continue
                    handler = c[probe].get("httpGet") or c[probe].get("tcpSocket")
                    if handler and not port_exists(handler["port"], ports):
                        errors.append(f"{cname}: {probe} port {handler['port']!r} is not a container port")

    errors += encore_contract_errors(objects, by_kind, pods, target)
    return errors


def encore_contract_errors(objects, by_kind, pods, target):
    """The promises between the manifests, the processes and the scrape config."""
    errors = []
    config = encore_config(objects)
    if config is None:
        return ["no ConfigMap encore-config with encore.toml"]
    seen = set()
    for w, t in pods:
        labels = t["metadata"].get("labels", {})
        role = labels.get("app.kubernetes.io/component")
        if role not in ROLES:
            continue
        seen.add(role)
        wname = name_of(w)
        spec = t["spec"]
        section = config.get(ROLES[role], {})
        ports = container_ports(spec)
        # What deploy/prometheus/prometheus.yml and the ServiceMonitor keep.
        if labels.get("app.kubernetes.io/part-of") != "encore":
            errors.append(f"{wname}: pod label app.kubernetes.io/part-of is not encore")
        annotations = t["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            errors.append(f"{wname}: pod annotation prometheus.io/scrape is not \"true\"")
        if "admin" not in ports:
            errors.append(f"{wname}: no container port named admin")
            continue
        if annotations.get("prometheus.io/port") != str(ports["admin"]):
            errors.append(
                f"{wname}: prometheus.io/port {annotations.get('prometheus.io/port')!r} "
                f"is not the admin port {ports['admin']}"
            )
        # encore.toml's addresses are the ports the containers expose.
        if "admin" not in section or port_of(section["admin"]) != ports["admin"]:
            errors.append(
                f"{wname}: encore.toml [{ROLES[role]}] admin {section.get('admin')!r} "
                f"is not the container's admin port {ports['admin']}"
            )
        if "listen" in section:
            listen = port_of(section["listen"])
            if listen not in ports.values():
                errors.append(
                    f"{wname}: encore.toml [{ROLES[role]}] listen {section['listen']!r} "
                    "is no container port"
                )
        for c in spec["containers"]:
            probe = c.get("livenessProbe", {}).get("httpGet", {})
            if probe.get("path") != "/healthz" or probe.get("port") != "admin":
                errors.append(f"{wname}: liveness probe is not GET /healthz on admin")
            probe = c.get("readinessProbe", {}).get("httpGet", {})
            if probe.get("path") != "/readyz" or probe.get("port") != "admin":
                errors.append(f"{wname}: readiness probe is not GET /readyz on admin")
            command = c.get("command", [])
            if "/etc/encore/config/encore.toml" not in command:
                errors.append(f"{wname}: container {c['name']} is not started with the config file")
        # The pod must outlive the process's own drain.
        grace_ms = section.get("shutdown_grace_ms")
        if grace_ms is not None and spec["terminationGracePeriodSeconds"] * 1000 <= grace_ms:
            errors.append(
                f"{wname}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} "
                f"does not exceed shutdown_grace_ms {grace_ms}"
            )
        gpus = [
            c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in spec["containers"]
        ]
        if role in ("actor", "learner", "reward-server"):
            if target["gpu"] and not all(gpus):
                errors.append(f"{wname}: no nvidia.com/gpu limit in the gpu overlay")
            if target["gpu"] and "nvidia.com/gpu.present" not in spec.get("nodeSelector", {}):
                errors.append(f"{wname}: no GPU node selector in the gpu overlay")
            if not target["gpu"] and any(gpus):
                errors.append(f"{wname}: requests a GPU outside the gpu overlay")
    missing = set(ROLES) - seen
    if missing:
        errors.append(f"no workload for {sorted(missing)}")

    # Redis: a StatefulSet with a claim template and the append-only file on.
    redis = by_kind.get("StatefulSet", {}).get("encore-redis")
    if redis is None or not redis["spec"].get("volumeClaimTemplates"):
        errors.append("encore-redis is not a StatefulSet with a volume claim template")
    conf = next(
        (o["data"]["redis.conf"] for o in objects
         if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("encore-redis-config")),
        "",
    )
    if not re.search(r"^appendonly yes$", conf, re.M):
        errors.append("redis.conf does not turn appendonly on")
    if config["coordinator"].get("store", "").split(":")[0] != "redis":
        errors.append("encore.toml [coordinator] store is not Redis")
    # Redis requires the password, and the coordinator's store URI has it.
    def env_of(kind, name):
        workload = by_kind.get(kind, {}).get(name)
        if workload is None:
            return {}, []
        c = workload["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e for e in c.get("env", [])}, c.get("command", [])

    redis_env, redis_command = env_of("StatefulSet", "encore-redis")
    password_ref = redis_env.get("REDISCLI_AUTH", {}).get("valueFrom", {}).get("secretKeyRef")
    if "--requirepass" not in redis_command or "$(REDISCLI_AUTH)" not in redis_command or not password_ref:
        errors.append("encore-redis does not require a password from a Secret (--requirepass $(REDISCLI_AUTH))")
    coordinator_env, _ = env_of("Deployment", "encore-coordinator")
    store = coordinator_env.get("ENCORE_COORDINATOR__STORE", {}).get("value", "")
    coordinator_ref = coordinator_env.get("REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef")
    if "$(REDIS_PASSWORD)@" not in store or coordinator_ref != password_ref:
        errors.append("the coordinator's store URI does not carry Redis's password from its Secret")

    # The ServiceMonitor selects a Service with an admin port for every role.
    for monitor in by_kind.get("ServiceMonitor", {}).values():
        ports = {e.get("port") for e in monitor["spec"]["endpoints"]}
        covered = set()
        for svc in by_kind.get("Service", {}).values():
            labels = svc["metadata"].get("labels", {})
            if selects(monitor["spec"]["selector"], labels) and ports & {
                p.get("name") for p in svc["spec"]["ports"]
            }:
                covered.add(labels.get("app.kubernetes.io/component"))
        if set(ROLES) - covered:
            errors.append(f"{name_of(monitor)}: finds no Service with an admin port for {sorted(set(ROLES) - covered)}")
        if not all(e.get("honorLabels") for e in monitor["spec"]["endpoints"]):
            errors.append(f"{name_of(monitor)}: honorLabels is off, so Encore's job label would be renamed")
    return errors


# --- the dashboard and the scrape configuration --------------------------------------

# Variables Grafana itself defines.
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}


def dashboard_errors(dashboard):
    """Problems of the Grafana dashboard that need no Grafana to see."""
    errors = []
    defined = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    for key in ("uid", "title"):
        if not dashboard.get(key):
            errors.append(f"dashboard: no {key}")
    ids = set()
    cells = {}
    for panel in dashboard.get("panels", []):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            errors.append(f"panel {title!r}: id {panel.get('id')} is used twice")
        ids.add(panel.get("id"))
        pos = panel.get("gridPos", {})
        if pos.get("x", 0) + pos.get("w", 0) > 24:
            errors.append(f"panel {title!r}: wider than the dashboard's 24 columns")
        for x in range(pos.get("x", 0), pos.get("x", 0) + pos.get("w", 0)):
            for y in range(pos.get("y", 0), pos.get("y", 0) + pos.get("h", 0)):
                if (x, y) in cells:
                    errors.append(f"panel {title!r} overlaps panel {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = title
            else:
                continue
            break
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {title!r}: not on the $datasource variable")
        targets = panel.get("targets", [])
        if not targets:
            errors.append(f"panel {title!r}: no query")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            errors.append(f"panel {title!r}: refIds repeat")
        for t in targets:
            if not t.get("expr"):
                errors.append(f"panel {title!r}: a query without expr")
            for var in re.findall(r"\$\{?(\w+)", t.get("expr", "")):
                if var not in defined and var not in GRAFANA_BUILTINS:
                    errors.append(f"panel {title!r}: ${var} is not a dashboard variable")
    return errors


def scrape_config_errors(config, promtool):
    """The shipped Prometheus configuration: its Kubernetes discovery by these
    rules (Debian's Prometheus is built without Kubernetes discovery, so
    promtool cannot read that block), the rest by promtool."""
    errors = []
    config = copy.deepcopy(config)
    jobs = config.get("scrape_configs", [])
    if not jobs:
        errors.append("prometheus.yml: no scrape_configs")
    for job in jobs:
        name = job.get("job_name")
        if not job.get("honor_labels"):
            errors.append(f"prometheus.yml job {name}: honor_labels is off, so Encore's job label would be renamed")
        for sd in job.pop("kubernetes_sd_configs", []):
            if sd.get("role") != "pod":
                errors.append(f"prometheus.yml job {name}: kubernetes_sd role {sd.get('role')!r}, not pod")
            unknown = set(sd) - {"role", "namespaces", "selectors", "api_server", "kubeconfig_file"}
            if unknown:
                errors.append(f"prometheus.yml job {name}: unknown kubernetes_sd keys {sorted(unknown)}")
            unknown = set(sd.get("namespaces", {})) - {"own_namespace", "names"}
            if unknown:
                errors.append(f"prometheus.yml job {name}: unknown namespaces keys {sorted(unknown)}")
            job.setdefault("static_configs", []).append({"targets": ["127.0.0.1:1"]})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(config, f)
    out = subprocess.run(
        [promtool, "check", "config", "--syntax-only", f.name],
        check=False, capture_output=True, text=True, timeout=60,
    )
    Path(f.name).unlink()
    if out.returncode != 0:
        detail = " ".join(line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip())
        errors.append(f"prometheus.yml: promtool: {detail}")
    return errors


# --- the checks failing on purpose ---------------------------------------------------


def find(objects, kind, name):
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise SystemExit(f"breakage needs {kind}/{name}, which is not rendered")


def containers(objects, kind, name):
    return find(objects, kind, name)["spec"]["template"]["spec"]["containers"]


def breakages():
    """(description, target, mutation) of manifests each check must refuse."""

    def typo_field(objs):
        c = containers(objs, "Deployment", "encore-coordinator")[0]
        c["livenessprobe"] = c.pop("livenessProbe")

    def wrong_type(objs):
        find(objs, "StatefulSet", "encore-learner")["spec"]["replicas"] = "two"

    def wrong_kind(objs):
        find(objs, "PodDisruptionBudget", "encore-actor")["apiVersion"] = "policy/v1beta2"

    def servicemonitor(objs):
        find(objs, "ServiceMonitor", "encore")["spec"]["endpoints"][0]["honorLabels"] = "yes"

    def service_port(objs):
        find(objs, "Service", "encore-coordinator")["spec"]["ports"][0]["targetPort"] = "grcp"

    def missing_probe(objs):
        del containers(objs, "Deployment", "encore-actor")[0]["readinessProbe"]

    def admin_port(objs):
        t = find(objs, "StatefulSet", "encore-learner")["spec"]["template"]
        t["metadata"]["annotations"]["prometheus.io/port"] = "9999"

    def grace(objs):
        t = find(objs, "Deployment", "encore-reward-server")["spec"]["template"]
        t["spec"]["terminationGracePeriodSeconds"] = 5

    def no_gpu(objs):
        c = containers(objs, "Deployment", "encore-actor")[0]
        del c["resources"]["limits"]["nvidia.com/gpu"]

    def root(objs):
        t = find(objs, "Deployment", "encore-actor")["spec"]["template"]
        t["spec"]["securityContext"]["runAsNonRoot"] = False

    def namespace(objs):
        del find(objs, "Deployment", "encore-grafana")["metadata"]["namespace"]

    def open_redis(objs):
        c = containers(objs, "StatefulSet", "encore-redis")[0]
        c["command"] = ["redis-server", "/etc/redis/redis.conf"]

    return [
        ("a misspelt field (livenessprobe)", "cpu-demo", typo_field),
        ("a string where an integer belongs (replicas)", "cpu-demo", wrong_type),
        ("an API version that does not exist", "base", wrong_kind),
        ("a ServiceMonitor field of the wrong type", "gpu", servicemonitor),
        ("a Service port aimed at no container port", "base", service_port),
        ("an actor without a readiness probe", "cpu-demo", missing_probe),
        ("a scrape annotation naming the wrong port", "cpu-demo", admin_port),
        ("a grace period shorter than the drain", "base", grace),
        ("a GPU actor without a GPU", "gpu", no_gpu),
        ("a pod allowed to run as root", "cpu-demo", root),
        ("an object outside the namespace", "cpu-demo", namespace),
        ("a Redis without a password", "gpu", open_redis),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kustomize", default="kubectl kustomize", help="the kustomize build command")
    parser.add_argument("--node", default="node")
    parser.add_argument("--promtool", default="promtool")
    parser.add_argument("--crd-modules", required=True, help="node_modules holding @kubernetes-models/prometheus-operator")
    parser.add_argument("--out", required=True, help="directory for the rendered manifests")
    args = parser.parse_args()

    repo = Path(__file__).resolve().parent.parent
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kustomize = args.kustomize.split()
    crd_validator = node_crd_validator(args.node, repo / "scripts" / "crd_validate.mjs", args.crd_modules)

    failed = False
    rendered = {}
    for name, target in TARGETS.items():
        started = time.monotonic()
        objects = render(kustomize, repo / target["path"])
        rendered[name] = objects
        (out / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
        errors = schema_errors(objects, crd_validator) + reference_errors(objects, target)
        kinds = {}
        for obj in objects:
            kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        took = time.monotonic() - started
        if errors:
            failed = True
            print(f"FAIL {name}: {len(objects)} objects, {len(errors)} problems ({took:.1f} s)")
            for e in errors:
                print(f"  {e}")
        else:
            print(
                f"ok   {name}: {len(objects)} objects valid against Kubernetes "
                f"{' and '.join(K8S_VERSIONS)} ({took:.1f} s)\n     {summary}"
            )

    dashboard = json.loads((repo / DASHBOARD).read_text())
    scrape = yaml.safe_load((repo / SCRAPE_CONFIG).read_text())
    for what, errors in (
        (DASHBOARD, dashboard_errors(dashboard)),
        (SCRAPE_CONFIG, scrape_config_errors(scrape, args.promtool)),
    ):
        if errors:
            failed = True
            print(f"FAIL {what}:")
            for e in errors:
                print(f"  {e}")
        else:
            print(f"ok   {what}")

    print("==> broken files must be refused")
    broken_dashboard = copy.deepcopy(dashboard)
    broken_dashboard["panels"][2]["targets"][0]["expr"] += ' * on() group_left vector($jobs)'
    broken_scrape = copy.deepcopy(scrape)
    broken_scrape["scrape_configs"][0]["relabel_configs"][0]["regex"] = "encore("
    for description, errors in (
        ("a dashboard query using an undefined variable", dashboard_errors(broken_dashboard)),
        ("a relabel rule with a broken regex", scrape_config_errors(broken_scrape, args.promtool)),
    ):
        if errors:
            print(f"ok   {description}: {errors[0]}")
        else:
            failed = True
            print(f"FAIL {description}: accepted")

    for description, name, mutate in breakages():
        objects = copy.deepcopy(rendered[name])
        mutate(objects)
        errors = schema_errors(objects, crd_validator) + reference_errors(objects, TARGETS[name])
        if errors:
            print(f"ok   {description} ({name}): {errors[0]}")
        else:
            failed = True
            print(f"FAIL {description} ({name}): accepted")
    if failed:
        sys.exit(1)
    print("OK: every rendered manifest, the dashboard and the scrape configuration are valid, "
          "and every broken one was refused")


if __name__ == "__main__":
    main()
