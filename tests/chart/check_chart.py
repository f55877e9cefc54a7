#!/usr/bin/env python3
"""Static checks of the Helm chart, the Dockerfiles and the example ModelDeployments.

Run through scripts/chart-test.sh (which installs Helm and the Python packages). Every check prints
one line; the last line is "N passed, M failed" and the exit status is non-zero on any failure.
"""

from __future__ import annotations

import copy
import base64
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tessera"
VALUES_DIR = Path(__file__).resolve().parent / "values"
HELM = os.environ.get("HELM", str(ROOT / ".tools" / "bin" / "helm"))
RELEASE, NAMESPACE = "tessera", "tessera-system"
# Minimum supported Kubernetes (Chart.yaml kubeVersion), the one Helm's kubectl is built for, and
# the newest kubernetes-validate knows.
_LATEST = kubernetes_validate.utils.latest_version()
K8S_VERSIONS = ["1.33.0", "1.35.0", _LATEST if _LATEST.count(".") == 2 else _LATEST + ".0"]
# Kinds whose schemas are not part of Kubernetes: their shape is asserted instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", kind)
                for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")}
# The alert rules and the dashboard ship as plain files (tests/tests/alerts.rs parses their PromQL).
RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD_FILE = CHART / "files" / "dashboard.json"
PROM_DURATION = re.compile(r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$")
VERSION_TAG = re.compile(r"^[0-9]+(\.[0-9]+)+([.-][0-9A-Za-z.-]+)?$")


# --------------------------------------------------------------------------------------------
# A tiny runner: each check is a function that raises AssertionError on failure.

class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def run(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - report every kind of failure as a failed check
            self.failed += 1
            detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc()
            print(f"FAIL {name}: {detail}".rstrip())
        else:
            self.passed += 1
            print(f"ok   {name}")


# --------------------------------------------------------------------------------------------
# YAML that refuses duplicate keys (a duplicated label is silently dropped by most tools).

class StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_all(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d]


# --------------------------------------------------------------------------------------------
# Helm

def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def template_args(values_file: Path | None, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", "1.33.0",
            "--include-crds"]
    if values_file:
        args += ["-f", str(values_file)]
    return args + list(extra)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


class Rendered:
    """The objects of one `helm template` run plus the values that produced them."""

    def __init__(self, name: str, values_file: Path | None):
        self.name = name
        self.values_file = values_file
        over = yaml.safe_load(values_file.read_text()) if values_file else {}
        self.values = deep_merge(DEFAULTS, over or {})
        self.text = helm(*template_args(values_file)).stdout
        self.objects = load_all(self.text)

    def kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        found = [o for o in self.kind(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {len(found)}"
        return found[0]

    @property
    def operator(self) -> dict:
        return self.one("Deployment")

    def operator_args(self) -> list[str]:
        return self.operator["spec"]["template"]["spec"]["containers"][0]["args"]

    def pod_specs(self) -> list[tuple[str, dict]]:
        return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
                for o in self.objects if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job")]


# --------------------------------------------------------------------------------------------
# Checks on one rendering

def check_lint(values_file: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "-n", NAMESPACE, "--kube-version", "1.33.0"]
    if values_file:
        args += ["-f", str(values_file)]
    helm(*args)


def check_k8s_schemas(r: Rendered, version: str) -> None:
    errors = []
    validated = 0
    for obj in r.objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            validated += 1
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} "
                          f"at {'.'.join(str(p) for p in e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")
    assert not errors, "\n  ".join(["schema errors:", *errors])
    assert validated >= 5, f"only {validated} objects validated"


def plan_children() -> list[dict]:
    """The objects `tessera-operator plan -o yaml` prints for the example cluster (every
    engine: examples/engines holds the vLLM and SGLang deployments)."""
    binary = os.environ.get("TESSERA_OPERATOR", str(ROOT / "target" / "debug" / "tessera-operator"))
    out = subprocess.run([binary, "plan", "--nodes", "examples/cluster.yaml", "-f",
                          "examples/deployments", "-f", "examples/engines", "-o", "yaml"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def check_plan_children(objects: list[dict], version: str) -> None:
    kinds = [o["kind"] for o in objects]
    assert kinds.count("Pod") >= 4 and "Service" in kinds and "ServiceAccount" in kinds, kinds
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} "
                          f"at {'.'.join(str(p) for p in e.path)}")
    assert not errors, "\n  ".join(["schema errors:", *errors])
    commands = {tuple(p["spec"]["containers"][0].get("command") or ["tessera-worker"])
                for p in objects if p["kind"] == "Pod"}
    assert ("vllm",) in commands and ("python3", "-m", "sglang.launch_server") in commands, commands
    for pod in (o for o in objects if o["kind"] == "Pod"):
        spec = pod["spec"]
        ctr = spec["containers"][0]
        assert int(ctr["resources"]["limits"]["nvidia.com/gpu"]) >= 1, pod["metadata"]["name"]
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        # Pinned by the Node's name (matchFields metadata.name), not the hostname label.
        field = terms["nodeSelectorTerms"][0]["matchFields"][0]
        assert field["key"] == "metadata.name" and field["operator"] == "In", field
        assert len(field["values"]) == 1, field
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
        assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert spec["automountServiceAccountToken"] is False


def check_labels(r: Rendered) -> None:
    required = ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by", "helm.sh/chart"]
    for o in r.objects:
        if o["kind"] == "CustomResourceDefinition":
            continue
        labels = o["metadata"].get("labels", {})
        missing = [k for k in required if k not in labels]
        assert not missing, f"{o['kind']}/{o['metadata']['name']} lacks labels {missing}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def check_security_context(r: Rendered) -> None:
    specs = r.pod_specs()
    assert specs, "no pod templates rendered"
    for where, spec in specs:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: pod seccomp"
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        for vol in spec.get("volumes", []):
            assert "hostPath" not in vol, f"{where}: hostPath volume {vol['name']}"
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            cn = f"{where} container {c['name']}"
            assert sc.get("runAsNonRoot") is True, f"{cn}: runAsNonRoot"
            assert sc.get("runAsUser") == 65532, f"{cn}: runAsUser {sc.get('runAsUser')}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{cn}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{cn}: allowPrivilegeEscalation"
            assert not sc.get("privileged"), f"{cn}: privileged"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cn}: capabilities.drop"
            assert not sc.get("capabilities", {}).get("add"), f"{cn}: capabilities.add"
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{cn}: seccomp"
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert res.get(part, {}).get("memory"), f"{cn}: resources.{part}.memory"
            assert res.get("requests", {}).get("cpu"), f"{cn}: resources.requests.cpu"
            for p in c.get("ports", []):
                assert "hostPort" not in p, f"{cn}: hostPort"


def image_ok(image: str) -> str | None:
    """None if the image is pinned to a version tag, else why not."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag"
    tag = last.split(":", 1)[1]
    if tag.lower() == "latest":
        return "uses latest"
    if not re.match(r"^v?[0-9]+\.[0-9]+", tag):
        return f"tag {tag!r} is not a version"
    return None


def check_images(r: Rendered) -> None:
    images = [c["image"] for _, spec in r.pod_specs()
              for c in spec.get("initContainers", []) + spec["containers"]]
    images += [a.split("=", 1)[1] for a in r.operator_args() if a.startswith("--worker-image=")]
    assert images, "no images"
    bad = [f"{i}: {why}" for i in images if (why := image_ok(i))]
    assert not bad, f"unpinned images: {bad}"
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    op = r.values["operator"]["image"]
    want = f"{op['repository']}:{op['tag'] or version}" + (f"@{op['digest']}" if op["digest"] else "")
    assert r.operator["spec"]["template"]["spec"]["containers"][0]["image"] == want


def all_rules(r: Rendered) -> list[tuple[str, dict]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", rule)
            for o in r.objects if o["kind"] in ("ClusterRole", "Role") for rule in o.get("rules", [])]


def check_rbac(r: Rendered) -> None:
    rules = all_rules(r)
    assert rules, "no RBAC rules"
    for where, rule in rules:
        for field in ("verbs", "resources", "apiGroups"):
            assert "*" not in rule.get(field, []), f"{where}: wildcard in {field}: {rule}"
        assert "nonResourceURLs" not in rule, f"{where}: nonResourceURLs"
        assert "secrets" not in rule.get("resources", []), f"{where}: secrets access"
        for verb in ("escalate", "bind", "impersonate", "deletecollection"):
            assert verb not in rule["verbs"], f"{where}: verb {verb}"
    rbac = [o for o in r.objects if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert "secret" not in yaml.safe_dump(rbac).lower(), "Secrets are mentioned in RBAC objects"


def operator_rules(r: Rendered) -> list[dict]:
    """Rules bound to the operator's ServiceAccount."""
    sa = r.one("ServiceAccount", "tessera")["metadata"]["name"]
    roles = set()
    for b in r.kind("ClusterRoleBinding") + r.kind("RoleBinding"):
        if any(s["name"] == sa for s in b["subjects"]):
            roles.add((b["roleRef"]["kind"], b["roleRef"]["name"], b["metadata"].get("namespace")))
    out = []
    for kind, name, ns in roles:
        role = [o for o in r.kind(kind) if o["metadata"]["name"] == name
                and (kind == "ClusterRole" or o["metadata"]["namespace"] == ns)]
        assert len(role) == 1, f"binding to missing {kind} {name}"
        out += role[0]["rules"]
    return out


def verbs_for(rules: list[dict], group: str, resource: str) -> set[str]:
    return {v for rule in rules if group in rule["apiGroups"] and resource in rule["resources"]
            for v in rule["verbs"]}


RBAC_CALLS = json.loads((ROOT / "tests" / "chart" / "rbac-calls.json").read_text())


def rule_grants(rules: list[dict], scope: str) -> set[tuple]:
    return {(g, res, verb, scope, tuple(rule.get("resourceNames", [])))
            for rule in rules for g in rule["apiGroups"] for res in rule["resources"]
            for verb in rule["verbs"]}


def check_operator_rbac(r: Rendered) -> None:
    """The operator's RBAC grants exactly what its code calls (tests/chart/rbac-calls.json,
    derived from the code by tests/tests/rbac_calls.rs), in cluster and namespaced mode."""
    watch = r.values["operator"]["watchNamespace"]
    mode = "namespaced" if watch else "cluster"
    workload_scope = "workloads" if watch else "cluster"
    granted: set[tuple] = set()
    for o in r.kind("ClusterRole"):
        if o["metadata"]["name"].endswith("node-agent"):
            continue
        granted |= rule_grants(o["rules"], "cluster")
    for o in r.kind("Role"):
        ns = o["metadata"].get("namespace")
        scope = "workloads" if watch and ns == watch else "release" if ns == NAMESPACE else ns
        granted |= rule_grants(o["rules"], scope)
    expected = {(c["apiGroup"], c["resource"], c["verb"], c["scope"], tuple(c.get("resourceNames", [])))
                for c in RBAC_CALLS[mode]}
    expected |= {(c["apiGroup"], c["resource"], c["verb"], workload_scope, ()) for c in RBAC_CALLS["admission"]}
    if not r.values["worker"]["networkPolicies"]["enabled"]:
        expected = {e for e in expected if e[1] != "networkpolicies"}
    if int(r.values["operator"]["replicas"]) <= 1:
        expected = {e for e in expected if e[1] != "leases"}
    else:
        name = r.values["operator"]["leaseName"]
        expected = {(g, res, v, s, (name,) if n else ()) if res == "leases" else (g, res, v, s, n)
                    for (g, res, v, s, n) in expected}
    assert granted == expected, (
        f"more than the code calls: {sorted(granted - expected)}; "
        f"missing: {sorted(expected - granted)}")


def check_scope(r: Rendered) -> None:
    """Namespaced mode: namespaced rights only in the watched namespace."""
    watch = r.values["operator"]["watchNamespace"]
    args = r.operator_args()
    cluster_roles = [o for o in r.kind("ClusterRole") if not o["metadata"]["name"].endswith("node-agent")]
    assert len(cluster_roles) == 1
    cluster_resources = {res for rule in cluster_roles[0]["rules"] for res in rule["resources"]}
    if watch:
        assert f"--watch-namespace={watch}" in args
        assert cluster_resources == {"nodes"}, f"namespaced mode ClusterRole has {cluster_resources}"
        role = [o for o in r.kind("Role") if o["metadata"].get("namespace") == watch]
        assert len(role) == 1, "no Role in the watched namespace"
        assert any("pods" in x["resources"] for x in role[0]["rules"])
        assert any(b["metadata"].get("namespace") == watch for b in r.kind("RoleBinding"))
    else:
        assert not any(a.startswith("--watch-namespace") for a in args)
        assert "modeldeployments" in cluster_resources


def check_leader_election(r: Rendered) -> None:
    args = r.operator_args()
    replicas = int(r.values["operator"]["replicas"])
    assert r.operator["spec"]["replicas"] == replicas
    assert ("--leader-elect" in args) == (replicas > 1), f"replicas={replicas} args={args}"
    pdbs = r.kind("PodDisruptionBudget")
    if replicas > 1:
        assert len(pdbs) == 1, "no PodDisruptionBudget with replicas > 1"
        assert pdbs[0]["spec"]["minAvailable"] == 1
        assert r.operator["spec"]["strategy"]["type"] == "RollingUpdate"
    else:
        assert not pdbs, "a PodDisruptionBudget over one replica would block node drains"
        assert r.operator["spec"]["strategy"]["type"] == "Recreate"
    env = {e["name"]: e for e in r.operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def check_operator_pod(r: Rendered) -> None:
    c = r.operator["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": r.values["operator"]["metricsPort"],
                     "health": r.values["operator"]["healthPort"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["args"][0] == "run"
    assert f"--health-addr=0.0.0.0:{ports['health']}" in c["args"]
    assert f"--metrics-addr=0.0.0.0:{ports['metrics']}" in c["args"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # The rank-group key: a Secret of 32 random bytes, mounted read-only, named by the flag.
    assert "--group-key-file=/etc/tessera/group-key/key" in c["args"]
    assert {"name": "group-key", "mountPath": "/etc/tessera/group-key", "readOnly": True} in c["volumeMounts"]
    vol = [v for v in r.operator["spec"]["template"]["spec"]["volumes"] if v["name"] == "group-key"]
    secrets = [o for o in r.kind("Secret") if o["metadata"]["name"] == vol[0]["secret"]["secretName"]]
    assert len(secrets) == 1 and secrets[0]["metadata"]["namespace"] == NAMESPACE
    assert len(base64.b64decode(secrets[0]["data"]["key"])) == 32
    svc = r.one("Service", "-metrics")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    sel = svc["spec"]["selector"]
    pod_labels = r.operator["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in sel.items()), "metrics Service selects no pod"
    assert r.operator["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def check_worker_network_policies(r: Rendered) -> None:
    args = r.operator_args()
    wnp = r.values["worker"]["networkPolicies"]
    assert ("--worker-network-policies" in args) == wnp["enabled"]
    sel = [a for a in args if a.startswith("--api-namespace-selector=")]
    if wnp["enabled"] and wnp["apiNamespaceSelector"]:
        assert sel == [f"--api-namespace-selector={wnp['apiNamespaceSelector']}"]
    else:
        assert not sel
    assert f"--monitoring-namespace={r.values['monitoring']['namespace']}" in args
    rdma = sorted(a for a in args if a.startswith("--rdma-resource="))
    want = sorted(f"--rdma-resource={k}={v}" for k, v in r.values["worker"]["rdma"]["resources"].items())
    assert rdma == want, (rdma, want)


def check_network_policy(r: Rendered) -> None:
    nps = r.kind("NetworkPolicy")
    if not r.values["networkPolicy"]["enabled"]:
        assert not nps
        return
    assert len(nps) == 1
    np = nps[0]["spec"]
    pod_labels = r.operator["spec"]["template"]["metadata"]["labels"]
    assert np["podSelector"]["matchLabels"].items() <= pod_labels.items(), "policy selects no pod"
    assert sorted(np["policyTypes"]) == ["Egress", "Ingress"]
    # DNS egress to the cluster DNS pods, UDP and TCP 53.
    dns = [e for e in np["egress"] if {(p["port"], p["protocol"]) for p in e.get("ports", [])}
           == {(53, "UDP"), (53, "TCP")}]
    assert len(dns) == 1, "no DNS egress rule"
    peer = dns[0]["to"][0]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    # The autoscaler's scrapes: the replica leaders' named `http` port, in the watched
    # namespace (any namespace when none is set).
    scrape = scrape_egress(np)
    assert len(scrape) == 1, "no egress rule to the workers' http port"
    assert scrape[0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert len(scrape[0]["to"]) == 1
    peer = scrape[0]["to"][0]
    assert peer["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "tessera-operator", "tessera.dev/role": "leader"}
    watch = r.values["operator"]["watchNamespace"]
    assert peer["namespaceSelector"] == (
        {"matchLabels": {"kubernetes.io/metadata.name": watch}} if watch else {})
    # API server egress on 443 and 6443; nothing else leaves the pod.
    api = [e for e in np["egress"] if e is not dns[0] and e is not scrape[0]]
    assert len(api) == 1 and {p["port"] for p in api[0]["ports"]} == {443, 6443}
    cidrs = r.values["networkPolicy"]["apiServerCIDRs"]
    if cidrs:
        assert [t["ipBlock"]["cidr"] for t in api[0]["to"]] == cidrs
    # Ingress: metrics only from the monitoring namespace; health port for probes.
    metrics = [i for i in np["ingress"] if i["ports"][0]["port"] == r.values["operator"]["metricsPort"]]
    assert len(metrics) == 1
    assert metrics[0]["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": r.values["monitoring"]["namespace"]}}}]
    ports = sorted(p["port"] for i in np["ingress"] for p in i["ports"])
    assert ports == sorted([r.values["operator"]["metricsPort"], r.values["operator"]["healthPort"]])


def scrape_egress(np: dict) -> list[dict]:
    """Egress rules of the operator's policy on the named port `http`."""
    return [e for e in np["egress"] if any(p["port"] == "http" for p in e.get("ports", []))]


def check_scrape_reaches_leaders(r: Rendered, objects: list[dict]) -> None:
    """The operator's egress rule matches every replica leader the operator builds, and each
    leader names its serving port `http`; workers that are not leaders are not matched."""
    np = r.kind("NetworkPolicy")[0]["spec"]
    want = scrape_egress(np)[0]["to"][0]["podSelector"]["matchLabels"]
    pods = [o for o in objects if o["kind"] == "Pod"]
    leaders = [p for p in pods if want.items() <= p["metadata"]["labels"].items()]
    assert leaders, "the policy matches no replica leader"
    assert all(p["metadata"]["labels"]["tessera.dev/role"] == "leader" for p in leaders)
    assert len(leaders) == sum(p["metadata"]["labels"].get("tessera.dev/role") == "leader"
                               for p in pods), "a replica leader is not matched"
    for p in leaders:
        names = {port.get("name") for c in p["spec"]["containers"] for port in c.get("ports", [])}
        assert "http" in names, f"{p['metadata']['name']}: no container port named http"


def check_service_monitor(r: Rendered) -> None:
    sms = r.kind("ServiceMonitor")
    if not r.values["monitoring"]["serviceMonitor"]["enabled"]:
        assert not sms
        return
    assert len(sms) == 1
    sm = sms[0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = r.one("Service", "-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    ep = sm["spec"]["endpoints"]
    assert len(ep) == 1 and ep[0]["port"] == "metrics" and ep[0]["path"] == "/metrics"
    # The operator's `namespace` label (the ModelDeployment's) must win over the target's: the
    # alert rules and the dashboard group by it.
    assert ep[0]["honorLabels"] is True
    for k in ("interval", "scrapeTimeout"):
        assert re.match(r"^[0-9]+(ms|s|m|h)$", ep[0][k])
    for k, v in r.values["monitoring"]["serviceMonitor"]["labels"].items():
        assert sm["metadata"]["labels"][k] == v


def check_pod_monitor(r: Rendered) -> None:
    all_pms = r.kind("PodMonitor")
    pms = [p for p in all_pms if not p["metadata"]["name"].endswith("node-agent")]
    agent_pms = [p for p in all_pms if p["metadata"]["name"].endswith("node-agent")]
    values = r.values["monitoring"]["podMonitor"]
    if not values["enabled"]:
        assert not all_pms
        return
    # The node agent's GPU metrics are scraped too when it runs: port `metrics` of its pods.
    if r.values["nodeAgent"]["enabled"]:
        assert len(agent_pms) == 1
        apm = agent_pms[0]
        ds = r.kind("DaemonSet")[0]
        assert apm["spec"]["selector"]["matchLabels"] == ds["spec"]["selector"]["matchLabels"]
        assert apm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        aep = apm["spec"]["podMetricsEndpoints"]
        assert [e["port"] for e in aep] == ["metrics"] and aep[0]["path"] == "/metrics"
        ports = ds["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in ports
        for k, v in values["labels"].items():
            assert apm["metadata"]["labels"][k] == v
    else:
        assert not agent_pms
    assert len(pms) == 1
    pm = pms[0]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["namespace"] == NAMESPACE
    # The replica leaders the operator builds (operator/src/build.rs labels).
    assert pm["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "tessera-operator", "tessera.dev/role": "leader"}
    watch = r.values["operator"]["watchNamespace"]
    assert pm["spec"]["namespaceSelector"] == ({"matchNames": [watch]} if watch else {"any": True})
    ep = pm["spec"]["podMetricsEndpoints"]
    assert len(ep) == 1 and ep[0]["port"] == "http" and ep[0]["path"] == "/metrics"
    assert ep[0]["interval"] == values["interval"]
    assert ep[0]["scrapeTimeout"] == values["scrapeTimeout"]
    relabel = {x["targetLabel"]: x["sourceLabels"] for x in ep[0]["relabelings"]}
    assert relabel["deployment"] == ["__meta_kubernetes_pod_label_tessera_dev_deployment"]
    for k, v in values["labels"].items():
        assert pm["metadata"]["labels"][k] == v


def expected_rule_groups(values: dict) -> list[dict]:
    """files/prometheus-rules.yaml with the values' `for` overrides and extra rule labels."""
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            if rule["alert"] in values["for"]:
                rule["for"] = values["for"][rule["alert"]]
            rule["labels"] = {**values["ruleLabels"], **rule.get("labels", {})}
    return groups


def check_prometheus_rule(r: Rendered) -> None:
    prs = r.kind("PrometheusRule")
    values = r.values["monitoring"]["prometheusRule"]
    if not values["enabled"]:
        assert not prs
        return
    assert len(prs) == 1
    pr = prs[0]
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    assert pr["metadata"]["namespace"] == NAMESPACE
    assert set(pr["spec"]) == {"groups"}, pr["spec"].keys()
    groups = pr["spec"]["groups"]
    assert groups == expected_rule_groups(values), "rendered rules differ from the file + values"
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names), f"duplicate group names {names}"
    alerts = []
    for g in groups:
        assert set(g) == {"name", "rules"}, g.keys()
        for rule in g["rules"]:
            alert = rule.get("alert")
            alerts.append(alert)
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule.keys()
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), alert
            assert PROM_DURATION.match(rule["for"]), f"{alert}: for {rule['for']!r}"
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), alert
            for k in ("summary", "description", "runbook"):
                assert rule["annotations"].get(k), f"{alert}: no {k} annotation"
            for k, v in values["ruleLabels"].items():
                if k != "severity":
                    assert rule["labels"][k] == v, f"{alert}: rule label {k}"
    assert len(set(alerts)) == len(alerts), f"duplicate alerts {alerts}"
    for k, v in values["labels"].items():
        assert pr["metadata"]["labels"][k] == v


def check_dashboard(r: Rendered) -> None:
    values = r.values["monitoring"]["dashboard"]
    key, want = values["sidecarLabel"], values["sidecarLabelValue"]
    cms = [o for o in r.kind("ConfigMap") if key in o["metadata"].get("labels", {})
           or o["metadata"]["name"].endswith("-dashboard")]
    if not values["enabled"]:
        assert not cms, [o["metadata"]["name"] for o in cms]
        return
    assert len(cms) == 1, [o["metadata"]["name"] for o in cms]
    cm = cms[0]
    assert cm["metadata"]["labels"][key] == want
    assert cm["metadata"]["namespace"] == (values["namespace"] or NAMESPACE)
    for k, v in values["labels"].items():
        assert cm["metadata"]["labels"][k] == v
    assert cm["metadata"].get("annotations", {}) == values["annotations"]
    assert list(cm["data"]) == ["tessera.json"], list(cm["data"])
    dash = json.loads(cm["data"]["tessera.json"])
    assert dash == json.loads(DASHBOARD_FILE.read_text()), "rendered dashboard differs from the file"
    assert dash["uid"] and dash["title"]
    targets = [t for p in dash["panels"] for t in p.get("targets", [])]
    assert targets and all(t.get("expr") for t in targets), "panels without PromQL targets"
    assert len(json.dumps(dash)) < 1_000_000, "a ConfigMap holds at most 1 MiB"


def check_rules_file() -> None:
    """The raw rules file is plain YAML (no Helm templating) and its alerts are the ones the
    schema lets `monitoring.prometheusRule.for` override."""
    text = RULES_FILE.read_text()
    assert "{{-" not in text and ".Values" not in text and ".Release" not in text, \
        "Helm templating in files/prometheus-rules.yaml"
    alerts = [r["alert"] for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    schema = json.loads((CHART / "values.schema.json").read_text())
    enum = schema["properties"]["monitoring"]["properties"]["prometheusRule"]["properties"]["for"][
        "propertyNames"]["enum"]
    assert sorted(alerts) == sorted(enum), f"alerts {alerts} vs schema {enum}"


def check_node_agent(r: Rendered) -> None:
    ds = r.kind("DaemonSet")
    if not r.values["nodeAgent"]["enabled"]:
        assert not ds and not any(o["metadata"]["name"].endswith("node-agent") for o in r.objects)
        return
    assert len(ds) == 1
    spec = ds[0]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["args"] == ["agent"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), "agent must not take a GPU"
    assert spec["nodeSelector"] == r.values["nodeAgent"]["nodeSelector"]
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
               for t in spec["tolerations"])
    rc = r.values["nodeAgent"]["runtimeClassName"]
    assert spec.get("runtimeClassName", "") == rc
    sa = spec["serviceAccountName"]
    bindings = [b for b in r.kind("ClusterRoleBinding") if any(s["name"] == sa for s in b["subjects"])]
    assert len(bindings) == 1
    assert not [b for b in r.kind("RoleBinding") if any(s["name"] == sa for s in b["subjects"])]
    role = [o for o in r.kind("ClusterRole") if o["metadata"]["name"] == bindings[0]["roleRef"]["name"]]
    assert role[0]["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]


# --------------------------------------------------------------------------------------------
# Checks on values and negative renders

def check_rejected(extra: tuple[str, ...], needle: str) -> None:
    proc = helm(*template_args(None, extra), check=False)
    assert proc.returncode != 0, f"helm template {' '.join(extra)} succeeded"
    assert needle in proc.stderr, f"expected {needle!r} in: {proc.stderr}"


def check_values_commented() -> None:
    """Every value that is not a group of other values has a comment right above it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str, bool]] = []  # (indent, key, is a group of values)
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack and not stack[-1][2]:  # a key inside a value (resources, nodeSelector...)
            continue
        path = [k for _, k, _ in stack] + [m.group(2)]
        node = schema
        for k in path:
            node = (node or {}).get("properties", {}).get(k)
        assert node is not None, f"{'.'.join(path)} is not in values.schema.json"
        is_group = node.get("type") == "object" and node.get("additionalProperties") is False \
            and path[-1] != "resources"
        stack.append((indent, m.group(2), is_group))
        if not is_group and not lines[i - 1].lstrip().startswith("#"):
            missing.append(".".join(path))
    assert not missing, f"values without a comment: {missing}"


def leaf_paths(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in schema.get("properties", {}).items():
        p = f"{prefix}{k}"
        if v.get("type") == "object" and v.get("additionalProperties") is False and k != "resources":
            out += leaf_paths(v, p + ".")
        elif k != "global":
            out.append(p)
    return out


def check_values_documented() -> None:
    doc = (ROOT / "docs" / "helm-values.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = [p for p in leaf_paths(schema) if f"`{p}`" not in doc]
    assert not missing, f"values missing from docs/helm-values.md: {missing}"


def check_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == "0.1.0" and str(chart["appVersion"]) == "0.1.0"
    assert chart["kubeVersion"] == ">=1.33.0-0"
    assert (CHART / "templates" / "NOTES.txt").exists()


# --------------------------------------------------------------------------------------------
# CRD

def check_crd_identical() -> None:
    top = (ROOT / "crds" / "modeldeployment.yaml").read_bytes()
    chart = (CHART / "crds" / "modeldeployment.yaml").read_bytes()
    assert top == chart, ("charts/tessera/crds/modeldeployment.yaml differs from "
                          "crds/modeldeployment.yaml; run scripts/gen-crd.sh")
    crds = list(CHART.glob("crds/*"))
    assert crds == [CHART / "crds" / "modeldeployment.yaml"], f"unexpected files {crds}"


def load_crd() -> dict:
    return yaml.safe_load((ROOT / "crds" / "modeldeployment.yaml").read_text())


def check_crd_shape() -> None:
    crd = load_crd()
    spec = crd["spec"]
    assert spec["group"] == "tessera.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "ModelDeployment" and spec["names"]["plural"] == "modeldeployments"
    assert "mdep" in spec["names"]["shortNames"]
    v = [x for x in spec["versions"] if x["name"] == "v1alpha1"]
    assert len(v) == 1 and v[0]["served"] and v[0]["storage"]
    sub = v[0]["subresources"]
    assert sub["status"] == {}
    assert sub["scale"] == {"specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector"}


def to_json_schema(node):
    """OpenAPI v3 structural schema -> JSON schema: drop x-kubernetes-*, honour nullable and
    reject unknown fields (the API server prunes or, with strict field validation, rejects them)."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator():
    v = [x for x in load_crd()["spec"]["versions"] if x["name"] == "v1alpha1"][0]
    schema = to_json_schema(v["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server itself, not the CRD schema.
    props = schema.setdefault("properties", {})
    props["metadata"] = {"type": "object"}
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def check_example(path: Path, validator) -> None:
    docs = load_all(path.read_text())
    assert docs, f"{path} is empty"
    for d in docs:
        assert d["apiVersion"] == "tessera.dev/v1alpha1" and d["kind"] == "ModelDeployment"
        errs = sorted(validator.iter_errors(d), key=lambda e: list(e.path))
        assert not errs, "\n  ".join(
            f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}" for e in errs)


def check_crd_schema_rejects(validator) -> None:
    """The converted schema is not vacuous: unknown fields and wrong types fail."""
    example = sorted((ROOT / "examples" / "deployments").glob("*.yaml"))[0]
    good = load_all(example.read_text())[0]
    bad = copy.deepcopy(good)
    bad["spec"]["noSuchField"] = 1
    assert list(validator.iter_errors(bad)), "unknown spec field accepted"
    bad = copy.deepcopy(good)
    bad["spec"]["replicas"] = "two"
    assert list(validator.iter_errors(bad)), "string replicas accepted"
    bad = copy.deepcopy(good)
    del bad["spec"]
    assert list(validator.iter_errors(bad)), "missing spec accepted"


# --------------------------------------------------------------------------------------------
# Dockerfiles

def check_dockerfile(path: Path) -> None:
    text = path.read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    stages: list[str] = []
    users: dict[int, str] = {}
    for ln in lines:
        if ln.upper().startswith("FROM "):
            parts = ln.split()
            image = parts[1] if not parts[1].startswith("--") else parts[2]
            alias = parts[-1].lower() if len(parts) >= 4 and parts[-2].upper() == "AS" else None
            if image.lower() not in stages:  # an earlier stage is not an image reference
                why = image_ok(image)
                assert why is None, f"{path.name}: FROM {image} {why}"
                assert "$" not in image, f"{path.name}: FROM with a build arg {image}"
            stages.append(alias or image)
        elif ln.upper().startswith("USER "):
            users[len(stages) - 1] = ln.split()[1]
    assert len(stages) >= 2, f"{path.name}: not multi-stage"
    user = users.get(len(stages) - 1)
    assert user, f"{path.name}: final stage has no USER"
    uid = user.split(":")[0]
    assert uid not in ("0", "root") and uid.isdigit(), f"{path.name}: final USER {user} (use a numeric non-root id)"
    assert "latest" not in text.lower(), f"{path.name}: mentions latest"
    assert re.search(r"^ENTRYPOINT \[", text, re.M), f"{path.name}: exec-form ENTRYPOINT"


def check_dockerfile_variants() -> None:
    cuda = (ROOT / "docker" / "worker-cuda.Dockerfile").read_text()
    assert "--features cuda" in cuda
    assert re.search(r"^FROM nvidia/cuda:12\.[0-9]+\.[0-9]+-runtime-ubuntu22\.04", cuda, re.M)
    for name in ("operator", "worker"):
        text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        assert f"--bin tessera-{name}" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in ("target/", "models/", ".tools/", ".git"):
        assert entry in ignore, f".dockerignore lacks {entry}"


# --------------------------------------------------------------------------------------------

def main() -> int:
    runner = Runner()
    run = runner.run

    run("Chart.yaml metadata", check_chart_metadata)
    run("chart CRD byte-identical to crds/modeldeployment.yaml", check_crd_identical)
    run("CRD names, scope, status and scale subresources", check_crd_shape)
    run("every value in values.yaml has a comment", check_values_commented)
    run("every value is documented in docs/helm-values.md", check_values_documented)
    run("files/prometheus-rules.yaml is plain YAML and matches the schema's alert names",
        check_rules_file)

    combos: list[tuple[str, Path | None]] = [("default", None)]
    combos += [(p.stem, p) for p in sorted(VALUES_DIR.glob("*.yaml"))]
    default: Rendered | None = None
    for name, values_file in combos:
        run(f"[{name}] helm lint --strict", check_lint, values_file)
        try:
            r = Rendered(name, values_file)
        except Exception as e:  # noqa: BLE001
            run(f"[{name}] helm template renders", lambda: (_ for _ in ()).throw(e))
            continue
        run(f"[{name}] helm template renders without duplicate keys", lambda: None)
        if name == "default":
            default = r
        for version in K8S_VERSIONS:
            run(f"[{name}] objects validate against Kubernetes {version} schemas (strict)",
                check_k8s_schemas, r, version)
        for label, fn in [
            ("standard labels", check_labels),
            ("restricted security context and resources", check_security_context),
            ("images pinned to version tags", check_images),
            ("RBAC: no wildcards, no secrets", check_rbac),
            ("operator RBAC grants exactly the calls the code makes", check_operator_rbac),
            ("cluster vs namespaced scope", check_scope),
            ("leader election iff replicas > 1, PDB", check_leader_election),
            ("operator probes, ports and metrics Service", check_operator_pod),
            ("worker network policy flags", check_worker_network_policies),
            ("operator NetworkPolicy", check_network_policy),
            ("ServiceMonitor", check_service_monitor),
            ("worker PodMonitor", check_pod_monitor),
            ("PrometheusRule from files/prometheus-rules.yaml", check_prometheus_rule),
            ("Grafana dashboard ConfigMap with the sidecar label", check_dashboard),
            ("node agent", check_node_agent),
        ]:
            run(f"[{name}] {label}", fn, r)

    run("schema rejects image tag latest", check_rejected,
        ("--set", "operator.image.tag=latest"), "/operator/image/tag")
    run("schema rejects worker image tag latest", check_rejected,
        ("--set", "worker.image.tag=latest"), "/worker/image/tag")
    run("template rejects latest even without schema validation", check_rejected,
        ("--skip-schema-validation", "--set", "worker.image.tag=latest"), "latest")
    run("schema rejects unknown values", check_rejected,
        ("--set", "operator.replica=2"), "additional properties")
    run("schema rejects zero replicas", check_rejected,
        ("--set", "operator.replicas=0"), "/operator/replicas")
    run("schema rejects an image with the tag in the repository", check_rejected,
        ("--set", "operator.image.repository=tessera-operator:latest"), "/operator/image/repository")
    run("schema rejects a `for` override of an unknown alert", check_rejected,
        ("--set", "monitoring.prometheusRule.for.TesseraNoSuchAlert=5m"), "TesseraNoSuchAlert")
    run("schema rejects a `for` override that is not a duration", check_rejected,
        ("--set", "monitoring.prometheusRule.for.TesseraRankLost=soon"),
        "/monitoring/prometheusRule/for/TesseraRankLost")
    run("schema rejects a dashboard sidecar label that is not a label key", check_rejected,
        ("--set", "monitoring.dashboard.sidecarLabel=bad:key"), "/monitoring/dashboard/sidecarLabel")
    run("schema rejects an RDMA resource count of 0", check_rejected,
        ("--set-json", 'worker.rdma.resources={"rdma/ib":0}'), "/worker/rdma/resources")
    run("schema rejects an RDMA resource name without a domain", check_rejected,
        ("--set-json", 'worker.rdma.resources={"ib":1}'), "invalid propertyName 'ib'")

    for df in sorted((ROOT / "docker").glob("*.Dockerfile")):
        run(f"{df.name}: multi-stage, pinned FROM tags, non-root USER", check_dockerfile, df)
    run("Dockerfile variants and .dockerignore", check_dockerfile_variants)

    try:
        validator = crd_validator()
    except Exception as e:  # noqa: BLE001
        run("CRD openAPIV3Schema converts to a JSON schema", lambda: (_ for _ in ()).throw(e))
    else:
        run("CRD schema rejects unknown fields and wrong types", check_crd_schema_rejects, validator)
        examples = sorted((ROOT / "examples" / "deployments").glob("*.yaml")) + sorted(
            (ROOT / "examples" / "engines").glob("*.yaml"))
        run("examples/deployments has examples", lambda: None if examples else (_ for _ in ()).throw(
            AssertionError("no examples")))
        for ex in examples:
            run(f"example {ex.name} validates against the CRD schema", check_example, ex, validator)

    try:
        children = plan_children()
    except Exception as e:  # noqa: BLE001
        run("tessera-operator plan -o yaml runs", lambda: (_ for _ in ()).throw(e))
    else:
        for version in K8S_VERSIONS:
            run(f"plan -o yaml objects validate for Kubernetes {version}", check_plan_children,
                children, version)
        if default is not None:
            run("operator NetworkPolicy lets the autoscaler reach every leader's http port",
                check_scrape_reaches_leaders, default, children)

    print(f"{runner.passed} passed, {runner.failed} failed")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
