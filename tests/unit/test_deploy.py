"""deploy/: manifests parse and agree with ftd's own settings, ports and metrics; ops tools accept them.

Kubernetes: every pod that runs `ftd daemon` has it as a native sidecar, shares a memory-backed
/dev/shm and the socket directory with its trainer, gives both the same FTD_JOB/FTD_SOCKET, and
opens exactly the ports its environment implies; the daemon's environment, resolved through the
ConfigMaps and Secrets under deploy/k8s, loads with `DaemonConfig` and finds itself in its peer
list, whose DNS names are those of its headless Service. Prometheus: promtool checks the config
and rules and runs the rule unit tests; every `ftd_*` name in the rules and the dashboard is
exported by `DaemonMetrics` (collected now, not copied). systemd: the unit has what it needs and
`systemd-analyze verify` accepts it. Slurm: the prolog really starts a supervised daemon with
the right peers and node index, and the epilog stops it and frees its memory.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import psutil
import pytest
import yaml

from ftd.config import CLIENT, DAEMON, KNOWN_ENV, SETTINGS, ClientConfig, DaemonConfig
from ftd.daemon.peers import Membership, split_host_port
from ftd.metrics import DaemonMetrics

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
SLURM = DEPLOY / "slurm"
SYSTEMD = DEPLOY / "systemd"
DASHBOARD = DEPLOY / "grafana" / "ftd-dashboard.json"

SHM = "/dev/shm"
DEFAULTS = {s.env: s.default for s in SETTINGS}
DAEMON_ENV = frozenset(s.env for s in SETTINGS if DAEMON in s.scopes)
CLIENT_ENV = frozenset(s.env for s in SETTINGS if CLIENT in s.scopes)
FTD_VAR = re.compile(r"(?<![A-Za-z0-9_])FTD_[A-Z0-9_]*[A-Z0-9]")
METRIC = re.compile(r"(?<![A-Za-z0-9_:.])ftd_[a-z0-9_]+")
K8S_KINDS = {"ConfigMap", "Secret", "Service", "Pod", "PyTorchJob", "PodMonitor", "ServiceMonitor"}


# ---- loading -----------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.lru_cache(maxsize=1)
def _k8s_docs() -> tuple[tuple[Path, dict], ...]:
    return tuple((p, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p))


def _ns(doc: dict) -> str:
    return doc.get("metadata", {}).get("namespace", "default")


@functools.lru_cache(maxsize=None)
def _index(kind: str) -> dict[tuple[str, str], dict]:
    return {(_ns(d), d["metadata"]["name"]): d for _, d in _k8s_docs() if d.get("kind") == kind}


def _secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


@dataclass
class Workload:
    """One pod template that runs ftd: where it is, its spec, and the pods it becomes."""

    where: str
    namespace: str
    meta: dict
    spec: dict
    pod_names: list[str]          # the pods made from this template
    job_pod_names: list[str]      # every pod of the job (for FTD_PEERS)
    restart_policy: str

    def __str__(self) -> str:
        return self.where


def _workloads() -> list[Workload]:
    out = []
    for path, doc in _k8s_docs():
        kind, meta = doc.get("kind"), doc.get("metadata", {})
        if kind == "Pod":
            name = meta["name"]
            out.append(Workload(f"{path.name}:Pod/{name}", _ns(doc), meta, doc["spec"], [name], [name],
                                doc["spec"].get("restartPolicy", "Always")))
        elif kind == "PyTorchJob":
            job, specs = meta["name"], doc["spec"]["pytorchReplicaSpecs"]
            names = {rt: [f"{job}-{rt.lower()}-{i}" for i in range(rs.get("replicas", 1))] for rt, rs in specs.items()}
            every = [n for rt in specs for n in names[rt]]
            for rt, rs in specs.items():
                tpl = rs["template"]
                out.append(Workload(f"{path.name}:PyTorchJob/{job}/{rt}", _ns(doc), tpl.get("metadata", {}),
                                    tpl["spec"], names[rt], every, rs.get("restartPolicy", "Never")))
    return out


def _is_daemon(container: dict) -> bool:
    words = [*container.get("command", []), *container.get("args", [])]
    return any(PurePosixPath(w).name == "ftd" for w in words) and "daemon" in words


class Unresolved(AssertionError):
    pass


def _resolve_env(container: dict, wl: Workload, pod_name: str) -> dict[str, str]:
    """The container's environment, with ConfigMap/Secret/fieldRef references resolved."""
    configmaps, secrets = _index("ConfigMap"), _index("Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        assert ref, f"{wl}: envFrom entry {source} is neither configMapRef nor secretRef"
        table = configmaps if "configMapRef" in source else secrets
        obj = table.get((wl.namespace, ref["name"]))
        if obj is None:
            raise Unresolved(f"{wl}: envFrom {ref['name']!r} is not defined under deploy/k8s")
        data = obj.get("data", {}) if "configMapRef" in source else _secret_data(obj)
        env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = str(var["value"])
            continue
        vf = var["valueFrom"]
        if "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            obj = configmaps.get((wl.namespace, ref["name"]))
            if obj is None or ref["key"] not in obj.get("data", {}):
                raise Unresolved(f"{wl}: {name} from ConfigMap {ref['name']}/{ref['key']}, "
                                 f"not defined under deploy/k8s")
            env[name] = str(obj["data"][ref["key"]])
        elif "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            obj = secrets.get((wl.namespace, ref["name"]))
            if obj is None or ref["key"] not in _secret_data(obj):
                raise Unresolved(f"{wl}: {name} from Secret {ref['name']}/{ref['key']}, not defined under deploy/k8s")
            env[name] = _secret_data(obj)[ref["key"]]
        elif "fieldRef" in vf:
            path = vf["fieldRef"]["fieldPath"]
            assert path in ("metadata.name", "metadata.namespace"), f"{wl}: {name} from fieldRef {path}"
            env[name] = pod_name if path == "metadata.name" else wl.namespace
        else:
            raise AssertionError(f"{wl}: cannot resolve {name}: {vf}")
    return env


def _mounts(container: dict) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def _mount_of(container: dict, path: str) -> tuple[str, str] | None:
    """(mountPath, volume) of the mount that holds `path`, the deepest one."""
    best = None
    for mount, vol in _mounts(container).items():
        if PurePosixPath(path) == PurePosixPath(mount) or PurePosixPath(mount) in PurePosixPath(path).parents:
            if best is None or len(mount) > len(best[0]):
                best = (mount, vol)
    return best


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---- every file parses; every FTD_ name is a setting ---------------------------------------------


def test_every_yaml_file_parses():
    files = _yaml_files()
    assert len(files) >= 10, files
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"
    kinds = {d.get("kind") for _, d in _k8s_docs()}
    assert kinds <= K8S_KINDS, f"this test does not know how to check {kinds - K8S_KINDS}: extend it"
    assert json.loads(DASHBOARD.read_text())["panels"]


def test_every_ftd_variable_under_deploy_is_a_setting():
    seen: dict[str, set[str]] = {}
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in FTD_VAR.findall(path.read_text(errors="replace")):
            seen.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: sorted(files) for name, files in seen.items() if name not in KNOWN_ENV}
    assert not unknown, f"FTD_ variables that ftd.config does not know (ftd would refuse to start): {unknown}"
    assert {"FTD_JOB", "FTD_SOCKET", "FTD_PEERS", "FTD_CLUSTER_TOKEN", "FTD_METRICS_PORT"} <= set(seen)


# ---- Kubernetes pods --------------------------------------------------------------------------------

WORKLOADS = _workloads()


def test_there_are_pods_to_check():
    wheres = [w.where for w in WORKLOADS]
    assert any(":Pod/" in w for w in wheres) and any(":PyTorchJob/" in w for w in wheres), wheres
    assert all("ftd-sidecar-pod.yaml" in w or "pytorchjob.yaml" in w for w in wheres), wheres


@dataclass
class PodCheck:
    wl: Workload
    daemon: dict = field(default_factory=dict)
    trainers: list[dict] = field(default_factory=list)


def _split(wl: Workload) -> PodCheck:
    daemons = [c for c in wl.spec.get("initContainers", []) if _is_daemon(c)]
    assert len(daemons) == 1, f"{wl}: want one `ftd daemon` init container (native sidecar), found {len(daemons)}"
    assert not any(_is_daemon(c) for c in wl.spec["containers"]), \
        f"{wl}: run the daemon as a native sidecar (initContainers + restartPolicy: Always), not a regular container"
    assert wl.spec["containers"], f"{wl}: no trainer container"
    return PodCheck(wl, daemons[0], wl.spec["containers"])


@pytest.mark.parametrize("wl", WORKLOADS, ids=str)
def test_daemon_is_a_native_sidecar_and_survives_trainer_crashes(wl):
    pc = _split(wl)
    assert pc.daemon.get("restartPolicy") == "Always", f"{wl}: the daemon init container needs restartPolicy: Always"
    # A trainer crash must restart the trainer inside the same pod (same daemon, same /dev/shm),
    # not replace the pod (Never/ExitCode), which would drop its memory.
    assert wl.restart_policy in ("OnFailure", "Always"), f"{wl}: restartPolicy {wl.restart_policy}"
    probes = [pc.daemon.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe") if pc.daemon.get(k)]
    assert probes, f"{wl}: the daemon has no probe"
    env = _resolve_env(pc.daemon, wl, wl.pod_names[0])
    socket = env.get("FTD_SOCKET")
    for probe in probes:
        if "exec" in probe:
            cmd = probe["exec"]["command"]
            assert PurePosixPath(cmd[0]).name == "ftd" and cmd[1] == "status", f"{wl}: probe {cmd}"
            if "--socket" in cmd:
                assert cmd[cmd.index("--socket") + 1] == socket, f"{wl}: probe socket differs from FTD_SOCKET"
        else:
            assert "tcpSocket" in probe, f"{wl}: probe {probe}"


@pytest.mark.parametrize("wl", WORKLOADS, ids=str)
def test_shared_memory_and_socket_volumes(wl):
    pc = _split(wl)
    volumes = {v["name"]: v for v in wl.spec.get("volumes", [])}
    env = _resolve_env(pc.daemon, wl, wl.pod_names[0])

    shm_vol = _mounts(pc.daemon).get(SHM)
    assert shm_vol, f"{wl}: the daemon does not mount a volume at {SHM}"
    empty = volumes[shm_vol].get("emptyDir")
    assert empty and empty.get("medium") == "Memory", f"{wl}: {shm_vol} must be an emptyDir with medium: Memory"
    assert empty.get("sizeLimit"), f"{wl}: give the memory volume a sizeLimit"
    shm_dir = env.get("FTD_SHM_DIR", DEFAULTS["FTD_SHM_DIR"])
    assert _mount_of(pc.daemon, shm_dir) == (SHM, shm_vol), f"{wl}: FTD_SHM_DIR={shm_dir} is not on the memory volume"

    socket = env.get("FTD_SOCKET")
    assert socket, f"{wl}: set FTD_SOCKET to a path on a volume the trainer mounts too"
    sock_mount = _mount_of(pc.daemon, socket)
    assert sock_mount and sock_mount[1] != shm_vol, f"{wl}: FTD_SOCKET={socket} is not on its own volume"
    assert "emptyDir" in volumes[sock_mount[1]], f"{wl}: the socket volume should be an emptyDir"

    for trainer in pc.trainers:
        mounts = _mounts(trainer)
        assert mounts.get(SHM) == shm_vol, f"{wl}: trainer {trainer['name']} does not mount {shm_vol} at {SHM}"
        assert mounts.get(sock_mount[0]) == sock_mount[1], \
            f"{wl}: trainer {trainer['name']} does not mount {sock_mount[1]} at {sock_mount[0]}"


@pytest.mark.parametrize("wl", WORKLOADS, ids=str)
def test_trainer_and_daemon_agree_on_job_and_socket(wl):
    pc = _split(wl)
    for pod in wl.pod_names:
        denv = _resolve_env(pc.daemon, wl, pod)
        daemon = DaemonConfig.load(environ=denv)
        for trainer in pc.trainers:
            tenv = _resolve_env(trainer, wl, pod)
            ftd_vars = {k for k in tenv if k.startswith("FTD_")}
            assert {"FTD_JOB", "FTD_SOCKET"} <= ftd_vars, f"{wl}: trainer {trainer['name']} lacks FTD_JOB/FTD_SOCKET"
            assert ftd_vars <= CLIENT_ENV, f"{wl}: trainer gets daemon-only settings {sorted(ftd_vars - CLIENT_ENV)}"
            client = ClientConfig.load(environ=tenv)
            assert (client.job, client.socket) == (daemon.job, daemon.socket), f"{wl}: pod {pod}"
            # Resolved from the same ConfigMap key (or the same literal) in both containers.
            for name in ("FTD_JOB", "FTD_SOCKET"):
                assert _env_source(trainer, name) == _env_source(pc.daemon, name), f"{wl}: {name} differs in source"


def _env_source(container: dict, name: str) -> Any:
    for var in container.get("env", []):
        if var["name"] == name:
            vf = var.get("valueFrom", {})
            ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
            return ("ref", ref["name"], ref["key"]) if ref else ("value", var.get("value"))
    configmaps = _index("ConfigMap")
    for source in reversed(container.get("envFrom", [])):  # a later source wins
        ref = source.get("configMapRef")
        if ref and not source.get("prefix"):
            data = next((d.get("data", {}) for (_, n), d in configmaps.items() if n == ref["name"]), {})
            if name in data:
                return ("ref", ref["name"], name)
    return None


def _peer_port(config: DaemonConfig, membership: Membership | None) -> int | None:
    if config.listen:
        return split_host_port(config.listen)[1]
    if membership is not None:
        return split_host_port(membership.peers[membership.me])[1]
    return None


@pytest.mark.parametrize("wl", WORKLOADS, ids=str)
def test_container_ports_are_the_ones_the_daemon_opens(wl):
    pc = _split(wl)
    config = DaemonConfig.load(environ=_resolve_env(pc.daemon, wl, wl.pod_names[0]))
    membership = Membership.from_config(config)
    expected: dict[str, int] = {}
    if membership is not None:
        port = _peer_port(config, membership)
        expected.update(peer=port, bulk=port + 1)
    if config.metrics_port:
        expected["metrics"] = config.metrics_port
    ports = {p["containerPort"]: p.get("name") for p in pc.daemon.get("ports", [])}
    assert sorted(ports) == sorted(expected.values()), f"{wl}: daemon container ports {ports}, env implies {expected}"
    assert all(ports.values()), f"{wl}: name every port"
    if config.metrics_port:
        assert ports[config.metrics_port] == "metrics", f"{wl}: the monitors scrape the port named `metrics`"
    for trainer in pc.trainers:
        clash = {p["containerPort"] for p in trainer.get("ports", [])} & set(ports)
        assert not clash, f"{wl}: trainer {trainer['name']} claims the daemon's ports {clash}"
    annotations = wl.meta.get("annotations", {})
    if "prometheus.io/scrape" in annotations:
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations.get("prometheus.io/port") == str(config.metrics_port), f"{wl}: prometheus.io/port"


@pytest.mark.parametrize("wl", WORKLOADS, ids=str)
def test_peer_list_is_the_headless_service_dns_names_and_each_pod_finds_itself(wl):
    pc = _split(wl)
    services = _index("Service")
    for pod in wl.pod_names:
        env = _resolve_env(pc.daemon, wl, pod)
        config = DaemonConfig.load(environ=env)
        membership = Membership.from_config(config)
        assert membership is not None, f"{wl}: no FTD_PEERS: the examples should show erasure coding"
        ref = next((v for v in pc.daemon.get("env", []) if v["name"] == "FTD_CLUSTER_TOKEN"), {})
        assert "secretKeyRef" in ref.get("valueFrom", {}), f"{wl}: FTD_CLUSTER_TOKEN must come from a Secret"

        sub = wl.spec.get("subdomain")
        assert sub, f"{wl}: set spec.subdomain to the headless Service so pods get DNS names"
        svc = services.get((wl.namespace, sub))
        assert svc, f"{wl}: no Service {sub!r} in namespace {wl.namespace} under deploy/k8s"
        assert svc["spec"].get("clusterIP") == "None", f"{wl}: Service {sub} is not headless"
        assert svc["spec"].get("publishNotReadyAddresses") is True, f"{wl}: Service {sub}: publishNotReadyAddresses"
        assert _selects(svc["spec"].get("selector", {}), wl.meta.get("labels", {})), \
            f"{wl}: Service {sub} does not select these pods"
        port = _peer_port(config, membership)
        svc_ports = {p["port"]: p.get("targetPort", p["port"]) for p in svc["spec"]["ports"]}
        assert svc_ports == {port: port, port + 1: port + 1}, f"{wl}: Service {sub} ports {svc_ports}"

        hosts = [split_host_port(e)[0] for e in membership.peers]
        suffix = f".{sub}.{wl.namespace}.svc"
        bad = [h for h in hosts if not (h.endswith(suffix) or h.endswith(suffix + ".cluster.local"))]
        assert not bad, f"{wl}: peers {bad} are not <pod>{suffix}"
        assert all(split_host_port(e)[1] == port for e in membership.peers), f"{wl}: peer ports differ from {port}"
        pods = [h.split(".")[0] for h in hosts]
        assert pods[membership.me] == pod, f"{wl}: pod {pod} resolves to entry {membership.me} ({pods[membership.me]})"
        if len(wl.job_pod_names) > 1:
            assert sorted(pods) == sorted(wl.job_pod_names), f"{wl}: FTD_PEERS {pods} != the job's pods"
        hostname = wl.spec.get("hostname")
        assert hostname in (None, pod), f"{wl}: spec.hostname {hostname} differs from the pod name {pod}"


def test_headless_service():
    (svc,) = [d for d in _docs(K8S / "headless-service.yaml") if d["kind"] == "Service"]
    spec = svc["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    pods = [w for w in WORKLOADS if w.spec.get("subdomain") == svc["metadata"]["name"]]
    assert pods, "no pod uses the headless service as its subdomain"
    for wl in pods:
        config = DaemonConfig.load(environ=_resolve_env(_split(wl).daemon, wl, wl.pod_names[0]))
        port = _peer_port(config, Membership.from_config(config))
        by_name = {p["name"]: (p["port"], p.get("targetPort")) for p in spec["ports"]}
        assert by_name == {"peer": (port, port), "bulk": (port + 1, port + 1)}, by_name


def test_monitors_scrape_the_metrics_port():
    (pm,) = _docs(K8S / "podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    selected = [w for w in WORKLOADS if _selects(pm["spec"]["selector"]["matchLabels"], w.meta.get("labels", {}))]
    assert len(selected) == len(WORKLOADS), "the PodMonitor misses some ftd pods"

    docs = _docs(K8S / "servicemonitor.yaml")
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    services = [d for d in docs if d["kind"] == "Service" and _selects(sm["spec"]["selector"]["matchLabels"],
                                                                        d["metadata"].get("labels", {}))]
    assert len(services) == 1, "the ServiceMonitor should select the metrics Service beside it"
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    svc_ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    for wl in WORKLOADS:
        assert _selects(services[0]["spec"]["selector"], wl.meta.get("labels", {})), f"{wl} not behind the Service"
        config = DaemonConfig.load(environ=_resolve_env(_split(wl).daemon, wl, wl.pod_names[0]))
        assert svc_ports["metrics"]["targetPort"] in (config.metrics_port, "metrics")


# ---- metric names ---------------------------------------------------------------------------------


def _exported_names(families: bool = False) -> set[str]:
    """Every series name the daemon's registry exposes, from DaemonMetrics as it is now (and the
    family names too, with `families`: prose may say `ftd_ec_encode_seconds`, PromQL may not)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
                "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}
    for family in DaemonMetrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
        if families:
            names.add(family.name)
    return names


def _promql_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # label values, not names
    return set(METRIC.findall(expr))


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _alert_exprs() -> list[str]:
    (doc,) = _docs(PROM / "ftd-alerts.yml")
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_and_dashboard_use_only_exported_metrics():
    series, family_or_series = _exported_names(), _exported_names(families=True)
    assert "ftd_shm_held_bytes" in series and "ftd_client_stall_seconds_bucket" in series
    (tests,) = _docs(PROM / "ftd-alerts.test.yml")
    fed = {s["series"] for t in tests["tests"] for s in t["input_series"]}
    # (where, names used, names allowed)
    checks = [
        ("ftd-alerts.yml expressions", set().union(*map(_promql_names, _alert_exprs())), series),
        ("ftd-dashboard.json expressions", set().union(*map(_promql_names, _dashboard_exprs())), series),
        ("ftd-alerts.test.yml input series", set().union(*map(_promql_names, fed)), series),
        ("ftd-alerts.yml text", set(METRIC.findall((PROM / "ftd-alerts.yml").read_text())), family_or_series),
        ("ftd-alerts.test.yml text", set(METRIC.findall((PROM / "ftd-alerts.test.yml").read_text())),
         family_or_series),
    ]
    missing = {where: sorted(used - allowed) for where, used, allowed in checks if used - allowed}
    assert not missing, (f"metric names that DaemonMetrics does not export: {missing}. Counters are exposed as "
                         f"<name>_total, histograms as <name>_bucket/_sum/_count.")
    assert len(checks[1][1]) >= 20 and len(checks[0][1]) >= 7


def test_dashboard_panels():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["targets"] and p["gridPos"]["w"] > 0 and p["gridPos"]["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "job", "instance"}
    exprs = " ".join(_dashboard_exprs())
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs


# ---- promtool ---------------------------------------------------------------------------------------


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return tool


def _run(*cmd: str, cwd: Path | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _has_kubernetes_sd(tool: str, tmp_path: Path) -> bool:
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: p\n    kubernetes_sd_configs:\n      - role: pod\n")
    return _run(tool, "check", "config", str(probe)).returncode == 0


def test_promtool_check_config(tmp_path):
    tool = _promtool()
    config = PROM / "prometheus.yml"
    if _has_kubernetes_sd(tool, tmp_path):
        result = _run(tool, "check", "config", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        return
    # Debian's promtool is built without Kubernetes service discovery. Check everything else with
    # promtool (the kubernetes_sd block swapped for an empty static one, relabelling kept), and
    # the discovery block by hand.
    warnings.warn("promtool lacks kubernetes_sd_configs (Debian build): checked with the SD block replaced",
                  stacklevel=1)
    doc = yaml.safe_load(config.read_text())
    pod_meta = re.compile(r"__meta_kubernetes_(pod_|namespace$)")
    for job in doc["scrape_configs"]:
        sds = job.pop("kubernetes_sd_configs", None)
        if sds is None:
            continue
        assert [sd["role"] for sd in sds] == ["pod"], job["job_name"]
        for rule in job.get("relabel_configs", []):
            for label in rule.get("source_labels", []):
                if label.startswith("__meta_"):
                    assert pod_meta.match(label), f"{job['job_name']}: {label} is not a pod-role label"
        job["static_configs"] = [{"targets": []}]
    for rules in doc.get("rule_files", []):
        shutil.copy(PROM / rules, tmp_path / rules)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(doc))
    result = _run(tool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_and_test_rules():
    tool = _promtool()
    result = _run(tool, "check", "rules", str(PROM / "ftd-alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run(tool, "test", "rules", "ftd-alerts.test.yml", cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    tool = _promtool()
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"ftd_dashboard:query_{i}", "expr": expr})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(tool, "check", "rules", str(tmp_path / "dash.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- systemd ----------------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string((SYSTEMD / "ftd.service").read_text())
    return parser


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not NAME=value"
            env[key.strip()] = value.strip()
    return env


def test_systemd_unit_keys():
    unit = _unit()
    svc = unit["Service"]
    assert svc["Type"] == "simple" and svc["Restart"] == "always"
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/ftd/ftd.env"
    assert svc["ExecStart"].split()[1:] == ["daemon"] and PurePosixPath(svc["ExecStart"].split()[0]).name == "ftd"
    assert svc["RuntimeDirectory"] == "ftd" and svc.get("User")
    assert svc.get("NoNewPrivileges") == "yes" and svc.get("ProtectSystem") in ("strict", "full")
    # Hardening that would take away the host's /dev/shm or delete the snapshots in it:
    assert svc.get("PrivateDevices", "no") == "no" and svc.get("RemoveIPC", "no") == "no"
    if svc.get("ProtectSystem") == "strict":
        assert "/dev/shm" in svc.get("ReadWritePaths", "").split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    env = _env_file(SYSTEMD / "ftd.env.example")
    assert set(env) <= DAEMON_ENV, f"not daemon settings: {sorted(set(env) - DAEMON_ENV)}"
    config = DaemonConfig.load(environ=env)
    assert PurePosixPath(config.socket).parent == PurePosixPath("/run") / svc["RuntimeDirectory"], \
        "the socket belongs in the unit's RuntimeDirectory (PrivateTmp hides /tmp from the trainers)"
    membership = Membership.from_config(config)
    assert membership is not None and membership.me == int(env["FTD_NODE"])


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed; the INI checks of test_systemd_unit_keys still ran")
    # verify wants ExecStart to exist: point it at this environment's ftd.
    ftd = tmp_path / "ftd"
    ftd.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ftd "$@"\n')
    ftd.chmod(0o755)
    text = (SYSTEMD / "ftd.service").read_text()
    exec_start = _unit()["Service"]["ExecStart"].split()[0]
    (tmp_path / "ftd.service").write_text(text.replace(exec_start, str(ftd)))
    result = _run(tool, "verify", str(tmp_path / "ftd.service"))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "ftd.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# ---- Slurm --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["prolog.sh", "epilog.sh"])
def test_slurm_scripts_parse(script):
    result = _run("bash", "-n", str(SLURM / script))
    assert result.returncode == 0, result.stderr
    assert os.access(SLURM / script, os.X_OK), f"{script} is not executable"


@dataclass
class SlurmNode:
    job: str
    env: dict[str, str]
    conf: dict[str, str]
    tmp: Path

    @property
    def pidfile(self) -> Path:
        return Path(self.conf["ftd_run_dir"]) / f"ftd-{self.job}.pid"

    @property
    def socket(self) -> Path:
        return Path(self.conf["ftd_run_dir"]) / self.job / "ftd.sock"

    def run(self, script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SLURM / script)], env=self.env, capture_output=True, text=True, timeout=30)

    def daemon_env(self) -> dict[str, str]:
        """The environment the prolog gave the last `ftd daemon` (recorded by the stand-in ftd)."""
        lines = (self.tmp / "daemon.env").read_bytes().split(b"\0")
        return dict(line.decode().split("=", 1) for line in lines if line)


FAKE_DAEMON = ("import os, socket, time; s = socket.socket(socket.AF_UNIX); s.bind(os.environ['FTD_SOCKET']); "
               "s.listen(); time.sleep(600)")


@pytest.fixture
def slurm_node(tmp_path) -> Iterator[Any]:
    """Run prolog/epilog against this machine: scontrol is a stand-in, paths are under tmp_path."""
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 2\necho "$3" | tr , "\\n"\n')
    # Records its environment, then runs the real daemon without the peers (they do not exist here)
    # - or, when tmp_path/fake exists, only something that listens on FTD_SOCKET (faster).
    (bin_dir / "ftd").write_text(
        f'#!/bin/sh\ncat /proc/$$/environ > "{tmp_path}/daemon.env"\n'
        f'[ -e "{tmp_path}/fake" ] && exec "{sys.executable}" -I -c "{FAKE_DAEMON}"\n'
        f'exec env -u FTD_PEERS -u FTD_LISTEN -u FTD_EC -u FTD_CLUSTER_TOKEN "{sys.executable}" -m ftd "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "shm").mkdir()
    (tmp_path / "cluster.key").write_text("0123456789abcdef0123456789abcdef\n")
    conf = {"ftd_bin": str(bin_dir / "ftd"), "ftd_run_dir": str(tmp_path / "run"), "ftd_log_dir": str(tmp_path / "log"),
            "ftd_cluster_key": str(tmp_path / "cluster.key"), "ftd_peer_port": "17000", "ftd_start_timeout": "20",
            "FTD_SHM_DIR": str(tmp_path / "shm"), "FTD_METRICS_PORT": "0", "FTD_EC": "2+1"}
    (tmp_path / "slurm.conf").write_text("".join(f"{k}={v}\n" for k, v in conf.items()))
    job = str(900000 + os.getpid() % 100000)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PROLOG_FTD_CONF": str(tmp_path / "slurm.conf"),
           "SLURM_JOB_ID": job, "SLURM_JOB_UID": str(os.getuid()), "SLURM_JOB_GID": str(os.getgid()),
           "SLURM_JOB_USER": "nobody-in-particular"}
    node = SlurmNode(job, env, conf, tmp_path)
    try:
        yield node
    finally:
        node.run("epilog.sh")
        if node.pidfile.exists():  # the epilog failed: do not leave our processes behind
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(node.pidfile.read_text()), signal.SIGKILL)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _status(node: SlurmNode) -> dict:
    env = {"PATH": os.environ["PATH"], "FTD_JOB": node.job, "FTD_SOCKET": str(node.socket)}
    result = subprocess.run([sys.executable, "-m", "ftd", "status", "--json"], env=env, capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_slurm_prolog_starts_a_supervised_daemon_and_epilog_removes_it(slurm_node):
    node = slurm_node
    node.env.update(SLURM_JOB_NODELIST="n0,n1,n2", SLURMD_NODENAME="n1")
    result = node.run("prolog.sh")
    assert result.returncode == 0 and node.socket.is_socket(), result.stderr

    # What the daemon was given: this node's index, the job's nodes as peers, a derived token.
    env = node.daemon_env()
    ftd_env = {k: v for k, v in env.items() if k.startswith("FTD_")}
    assert ftd_env["FTD_JOB"] == node.job and ftd_env["FTD_SOCKET"] == str(node.socket)
    assert ftd_env["FTD_NODE"] == "1" and ftd_env["FTD_PEERS"] == "n0:17000,n1:17000,n2:17000"
    assert ftd_env["FTD_LISTEN"] == "0.0.0.0:17000" and len(ftd_env["FTD_CLUSTER_TOKEN"]) == 64
    assert not {k for k in env if k.startswith("SLURM")}, "slurmd's environment leaked into the daemon"
    config = DaemonConfig.load(environ=ftd_env)
    assert Membership.from_config(config).me == 1

    status = _status(node)
    assert status["job"] == node.job
    shm = Path(node.conf["FTD_SHM_DIR"]) / f"ftd-{node.job}"
    assert shm.is_dir()

    # A killed daemon is restarted by the supervisor and serves again.
    supervisor = psutil.Process(int(node.pidfile.read_text()))
    (first,) = supervisor.children()
    first.kill()
    _wait_for(lambda: not first.is_running() or first.status() == psutil.STATUS_ZOMBIE, 5, "the killed daemon")
    _wait_for(lambda: _try_status(node), 15, "a restarted daemon to answer")
    assert first.pid not in [c.pid for c in supervisor.children()]

    result = node.run("epilog.sh")
    assert result.returncode == 0, result.stderr
    _wait_for(lambda: not supervisor.is_running() or supervisor.status() == psutil.STATUS_ZOMBIE, 5, "the supervisor")
    assert not node.pidfile.exists() and not node.socket.parent.exists() and not shm.exists()


def _try_status(node: SlurmNode) -> bool:
    try:
        _status(node)
        return True
    except AssertionError:
        return False


@pytest.mark.parametrize("nodes,key", [("n0", True), ("n0,n1", False)], ids=["one-node", "no-cluster-key"])
def test_slurm_prolog_without_peers(slurm_node, nodes, key):
    """One node (or no more than m), or no site key: local snapshots only, never a failed prolog."""
    node = slurm_node
    (node.tmp / "fake").touch()  # the real daemon is exercised above
    if not key:
        Path(node.conf["ftd_cluster_key"]).unlink()
    node.env.update(SLURM_JOB_NODELIST=nodes, SLURMD_NODENAME="n0")
    result = node.run("prolog.sh")
    assert result.returncode == 0 and node.socket.is_socket(), result.stderr
    env = node.daemon_env()
    assert "FTD_PEERS" not in env and "FTD_CLUSTER_TOKEN" not in env and env["FTD_NODE"] == "0"
    assert DaemonConfig.load(environ={k: v for k, v in env.items() if k.startswith("FTD_")}).job == node.job
    assert node.run("epilog.sh").returncode == 0
    assert not node.pidfile.exists() and not node.socket.parent.exists()


def test_slurm_prolog_never_fails_the_node(slurm_node):
    node = slurm_node
    node.env.update(SLURM_JOB_NODELIST="n0,n1", SLURMD_NODENAME="elsewhere")
    result = node.run("prolog.sh")
    assert result.returncode == 0, "a failing prolog drains the node"
    assert "not in the job's node list" in result.stderr and not node.pidfile.exists()
