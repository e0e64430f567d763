"""Renders k8s/base and every overlay with kustomize and checks what comes out, offline.

    .tools/venv/bin/python scripts/py/check-k8s.py --kubectl PATH --nats-server PATH \
        --kubernetes-version 1.32 --keda-crd scripts/k8s/keda.sh_scaledobjects-v2.20.2.yaml \
        k8s/base k8s/overlays/dev k8s/overlays/gpu

Run by scripts/check-k8s.sh, which installs the tools. For each kustomization:

1. `kubectl kustomize` renders it (the kustomize built into kubectl).
2. Every object validates against the Kubernetes JSON schemas of --kubernetes-version in strict
   mode (unknown fields are errors) with PyPI's kubernetes-validate; every ScaledObject against
   the openAPIV3Schema of KEDA's CRD (--keda-crd), made strict the same way. Any other kind
   without a schema is an error.
3. Semantic checks no schema can make: every Service and PDB selects exactly one workload; named
   target and probe ports exist; mounts have volumes; ConfigMap and Secret references (names
   and keys) resolve; a ScaledObject targets a Deployment that sets no `replicas`; no PDB's
   minAvailable blocks every eviction; every container meets the restricted pod-security
   profile; the NATS URLs and KEDA's monitoring endpoint name a Service and a port that exist;
   the stream replicas fit the NATS cluster, whose routes name every server.
4. nats.conf from the NATS ConfigMap passes `nats-server -t`.

Prints one line per kustomization; exits 1 with every problem found, each naming the
kustomization and the object.
"""

import argparse
import ast
import copy
import os
import re
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

import kubernetes_validate
import yaml
from jsonschema import Draft202012Validator

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
NATS_MAX_REPLICAS = 5  # JetStream's limit for a stream's replicas
# Where the streams and the byte-limit defaults come from (read, to size the NATS storage).
TOPOLOGY_RS = "shared/bus/src/topology.rs"
SETTINGS_RS = "shared/bus/src/settings.rs"


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, obj, message):
        name = f"{obj['kind']}/{obj['metadata'].get('name', '?')}" if obj else "-"
        self.items.append(f"{where}: {name}: {message}")


def render(kubectl, path):
    out = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"[check-k8s] FAIL: `kubectl kustomize {path}`:\n{out.stderr.strip()}")
    return [o for o in yaml.safe_load_all(out.stdout) if o]


# --- schemas -------------------------------------------------------------------------------


def strict_openapi(schema):
    """A CRD's structural openAPIV3Schema as a JSON schema that, like the API server's
    strict field validation, rejects fields it does not declare."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        for key in list(node):
            if key.startswith("x-kubernetes-"):
                node.pop(key)
        if node.get("nullable"):
            node.pop("nullable")
            if isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            walk(value)

    walk(schema)
    # metadata is `type: object` in every CRD: the API server checks it as ObjectMeta.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "additionalProperties": False,
    }
    return schema


def load_crd(path):
    crd = next(d for d in yaml.safe_load_all(open(path)) if d)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    validators = {}
    for version in crd["spec"]["versions"]:
        if version.get("served"):
            schema = strict_openapi(version["schema"]["openAPIV3Schema"])
            Draft202012Validator.check_schema(schema)
            validators[(f"{group}/{version['name']}", kind)] = Draft202012Validator(schema)
    return validators


def validate_schemas(where, objs, version, crds, problems):
    for obj in objs:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in crds:
            for err in sorted(crds[key].iter_errors(obj), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in err.path) or "(top)"
                problems.add(where, obj, f"KEDA CRD schema: {path}: {err.message}")
            continue
        if key[0] and key[0].split("/")[0].endswith("keda.sh"):
            problems.add(where, obj, f"no schema for {key[0]} {key[1]} (only {sorted(crds)})")
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            problems.add(where, obj, f"Kubernetes {version} schema: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.add(where, obj, f"no Kubernetes {version} schema: {e}")


# --- semantic checks ------------------------------------------------------------------------


def index(objs):
    by = {}
    for obj in objs:
        by.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    return by


def pod_spec(obj):
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"]["metadata"].get("labels", {})


def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(selector, by):
    return [w for kind in WORKLOADS for w in by.get(kind, {}).values()
            if selects(selector, pod_labels(w))]


def container_ports(workload):
    ports = {}
    for c in pod_spec(workload)["containers"]:
        for p in c.get("ports", []):
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
            ports[p["containerPort"]] = p["containerPort"]
    return ports


def keda_targets(by):
    """Deployment name -> its ScaledObject."""
    out = {}
    for so in by.get("ScaledObject", {}).values():
        ref = so["spec"]["scaleTargetRef"]
        if ref.get("kind", "Deployment") == "Deployment":
            out[ref["name"]] = so
    return out


def replicas_of(workload, by):
    so = keda_targets(by).get(workload["metadata"]["name"]) if workload["kind"] == "Deployment" else None
    if so is not None:
        return so["spec"].get("minReplicaCount", 0) or 1
    return workload["spec"].get("replicas", 1)


def check_services(where, by, problems):
    for svc in by.get("Service", {}).values():
        selector = svc["spec"].get("selector")
        if not selector:
            problems.add(where, svc, "no selector")
            continue
        hits = selected_workloads(selector, by)
        if len(hits) != 1:
            names = [f"{w['kind']}/{w['metadata']['name']}" for w in hits]
            problems.add(where, svc, f"selects {len(hits)} workloads, not one: {names}")
            continue
        ports = container_ports(hits[0])
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if target not in ports:
                problems.add(where, svc, f"port {p.get('name', p['port'])}: targetPort {target!r} "
                             f"is no container port of {hits[0]['kind']}/{hits[0]['metadata']['name']}")


def check_pdbs(where, by, problems):
    for pdb in by.get("PodDisruptionBudget", {}).values():
        selector = pdb["spec"].get("selector", {}).get("matchLabels")
        hits = selected_workloads(selector, by)
        if len(hits) != 1:
            problems.add(where, pdb, f"selects {len(hits)} workloads, not one")
            continue
        min_available = pdb["spec"].get("minAvailable")
        replicas = replicas_of(hits[0], by)
        if isinstance(min_available, int) and min_available >= replicas:
            problems.add(where, pdb, f"minAvailable {min_available} with {replicas} replica(s) of "
                         f"{hits[0]['kind']}/{hits[0]['metadata']['name']} blocks every eviction")


def probe_ports(container):
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(name) or {}
        for action in ("httpGet", "tcpSocket", "grpc"):
            if action in probe:
                yield name, probe[action]["port"]


def check_pods(where, by, problems):
    configmaps, secrets = by.get("ConfigMap", {}), by.get("Secret", {})

    def ref(obj, kind, name, key=None, optional=False):
        pool = configmaps if kind == "ConfigMap" else secrets
        if optional:
            return
        if name not in pool:
            problems.add(where, obj, f"{kind} {name!r} does not exist")
        elif key is not None and key not in {**pool[name].get("data", {}),
                                             **pool[name].get("stringData", {}),
                                             **pool[name].get("binaryData", {})}:
            problems.add(where, obj, f"{kind} {name!r} has no key {key!r}")

    for kind in WORKLOADS:
        for w in by.get(kind, {}).values():
            spec = pod_spec(w)
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            if kind == "StatefulSet":
                for t in w["spec"].get("volumeClaimTemplates", []):
                    volumes[t["metadata"]["name"]] = {"name": t["metadata"]["name"]}
            for v in volumes.values():
                if "configMap" in v:
                    for item in v["configMap"].get("items", []) or [None]:
                        ref(w, "ConfigMap", v["configMap"]["name"], item and item["key"],
                            v["configMap"].get("optional", False))
                if "secret" in v:
                    for item in v["secret"].get("items", []) or [None]:
                        ref(w, "Secret", v["secret"]["secretName"], item and item["key"],
                            v["secret"].get("optional", False))
                if "hostPath" in v:
                    problems.add(where, w, f"volume {v['name']}: hostPath (restricted profile)")

            # restricted pod security: the pod's settings, then each container's
            psc = spec.get("securityContext", {})
            for field in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(field):
                    problems.add(where, w, f"{field} (restricted profile)")
            for c in containers(spec):
                cname = f"container {c['name']}"
                csc = c.get("securityContext", {})
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        problems.add(where, w, f"{cname}: mount {m['name']!r} has no volume")
                for name, port in probe_ports(c):
                    names = {p.get("name") for p in c.get("ports", [])}
                    numbers = {p["containerPort"] for p in c.get("ports", [])}
                    if isinstance(port, str) and port not in names:
                        problems.add(where, w, f"{cname}: {name} port {port!r} is not a named port")
                    if isinstance(port, int) and port not in numbers:
                        problems.add(where, w, f"{cname}: {name} port {port} is not a container port")
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        ref(w, "ConfigMap", src["configMapRef"]["name"], None,
                            src["configMapRef"].get("optional", False))
                    if "secretRef" in src:
                        ref(w, "Secret", src["secretRef"]["name"], None,
                            src["secretRef"].get("optional", False))
                for env in c.get("env", []):
                    vf = env.get("valueFrom", {})
                    if "configMapKeyRef" in vf:
                        r = vf["configMapKeyRef"]
                        ref(w, "ConfigMap", r["name"], r["key"], r.get("optional", False))
                    if "secretKeyRef" in vf:
                        r = vf["secretKeyRef"]
                        ref(w, "Secret", r["name"], r["key"], r.get("optional", False))
                if csc.get("privileged"):
                    problems.add(where, w, f"{cname}: privileged (restricted profile)")
                if csc.get("allowPrivilegeEscalation") is not False:
                    problems.add(where, w, f"{cname}: allowPrivilegeEscalation is not false")
                caps = csc.get("capabilities", {})
                if "ALL" not in caps.get("drop", []):
                    problems.add(where, w, f"{cname}: capabilities do not drop ALL")
                if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
                    problems.add(where, w, f"{cname}: adds capabilities {caps['add']}")
                if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
                    problems.add(where, w, f"{cname}: runAsNonRoot is not true")
                if csc.get("runAsUser", psc.get("runAsUser")) == 0:
                    problems.add(where, w, f"{cname}: runAsUser 0")
                seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
                if seccomp not in ("RuntimeDefault", "Localhost"):
                    problems.add(where, w, f"{cname}: seccompProfile {seccomp!r}, not RuntimeDefault")
                for p in c.get("ports", []):
                    if p.get("hostPort"):
                        problems.add(where, w, f"{cname}: hostPort (restricted profile)")


def check_keda(where, by, problems):
    deployments = by.get("Deployment", {})
    for name, so in keda_targets(by).items():
        if name not in deployments:
            problems.add(where, so, f"scaleTargetRef: no Deployment {name!r}")
        elif "replicas" in deployments[name]["spec"]:
            problems.add(where, deployments[name], "sets `replicas` although a ScaledObject "
                         "scales it (a re-apply would fight the HPA)")
        for trigger in so["spec"].get("triggers", []):
            endpoint = trigger.get("metadata", {}).get("natsServerMonitoringEndpoint")
            if endpoint:
                check_endpoint(where, so, by, f"http://{endpoint}", problems)


def check_endpoint(where, obj, by, url, problems):
    """A URL whose host is <service>, <service>.<namespace>[.svc…] or <pod>.<headless service>
    must name a Service in the rendered objects (and its namespace) exposing the port."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port
    labels = host.split(".")
    services = by.get("Service", {})
    namespace = obj["metadata"].get("namespace")
    if labels[0] in services:
        svc = services[labels[0]]
        if len(labels) > 1 and labels[1] != svc["metadata"].get("namespace"):
            problems.add(where, obj, f"{url}: Service {labels[0]!r} is in namespace "
                         f"{svc['metadata'].get('namespace')!r}, not {labels[1]!r}")
    elif len(labels) > 1 and labels[1] in services and services[labels[1]]["spec"].get("clusterIP") == "None":
        svc = services[labels[1]]
        sts = [s for s in by.get("StatefulSet", {}).values()
               if s["spec"]["serviceName"] == labels[1]]
        pods = {f"{s['metadata']['name']}-{i}" for s in sts for i in range(s["spec"].get("replicas", 1))}
        if labels[0] not in pods:
            problems.add(where, obj, f"{url}: no pod {labels[0]!r} behind {labels[1]!r} ({sorted(pods)})")
    else:
        problems.add(where, obj, f"{url}: {host!r} names no Service in namespace {namespace!r}")
        return
    if port not in {p["port"] for p in svc["spec"]["ports"]}:
        problems.add(where, obj, f"{url}: Service {svc['metadata']['name']!r} has no port {port}")


def nats_size(text):
    """nats.conf sizes: K/M/G/T are powers of 1000, KB/KiB… powers of 1024 (as nats-server
    2.15 reads them)."""
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)(i?b)?", text.strip().lower())
    if not m:
        raise ValueError(f"size {text!r}")
    power = " kmgt".index(m.group(2) or " ")
    return int(m.group(1)) * (1024 if m.group(3) else 1000) ** power


def k8s_quantity(text):
    m = re.fullmatch(r"(\d+)([KMGTE]i?)?", str(text))
    if not m:
        raise ValueError(f"quantity {text!r}")
    unit = m.group(2) or ""
    power = " KMGTE".index(unit[:1] or " ")
    return int(m.group(1)) * (1024 if unit.endswith("i") else 1000) ** power


def rust_default(name):
    """The default_value_t of the bus setting read from env `name` (an integer expression)."""
    m = re.search(r'env = "%s", default_value_t = ([^)]+)\)' % name, open(SETTINGS_RS).read())
    if not m:
        raise ValueError(f"no default for {name} in {SETTINGS_RS}")
    node = ast.parse(m.group(1).replace("_", ""), mode="eval").body

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.LShift, ast.Mult, ast.Add)):
            a, b = ev(n.left), ev(n.right)
            return a << b if isinstance(n.op, ast.LShift) else a * b if isinstance(n.op, ast.Mult) else a + b
        raise ValueError(f"default of {name}: {m.group(1)!r}")

    return ev(node)


def check_nats_storage(where, data, conf, conf_map, sts, replicas, servers, problems):
    """Every stream and bucket with a byte limit reserves it in max_file_store on each server
    holding a replica (past it JetStream refuses to place more: "insufficient storage"), and
    max_file_store must fit the volume."""
    try:
        streams = set(re.findall(r'stream: "(MR_\w+)"', open(TOPOLOGY_RS).read()))
        stream_bytes = int(data.get("MILLRACE_STREAM_MAX_BYTES", rust_default("MILLRACE_STREAM_MAX_BYTES")))
        outcome_bytes = int(data.get("MILLRACE_OUTCOME_MAX_BYTES", rust_default("MILLRACE_OUTCOME_MAX_BYTES")))
        m = re.search(r"max_file_store:\s*([^\s#]+)", conf)
        max_file = nats_size(m.group(1)) if m else None
        pvc = [t for t in sts["spec"].get("volumeClaimTemplates", []) if t["metadata"]["name"] == "data"]
        volume = k8s_quantity(pvc[0]["spec"]["resources"]["requests"]["storage"]) if pvc else None
    except (OSError, ValueError) as e:
        problems.add(where, conf_map, f"cannot size the NATS storage: {e}")
        return
    if not streams:
        problems.add(where, conf_map, f"no streams found in {TOPOLOGY_RS}")
        return
    if max_file is None or volume is None:
        problems.add(where, conf_map, "nats.conf sets no max_file_store, or StatefulSet nats has no `data` volume claim")
        return
    reserved = len(streams) * stream_bytes + max(outcome_bytes, 0)
    per_server = reserved * replicas // servers if replicas < servers else reserved
    if per_server > max_file:
        problems.add(where, conf_map, f"max_file_store {max_file / 1e9:.1f} GB is below what the "
                     f"streams and buckets reserve per server at R{replicas} on {servers}: "
                     f"{len(streams)} × {stream_bytes} + {outcome_bytes} bytes = {per_server / 1e9:.1f} GB")
    if max_file >= volume:
        problems.add(where, conf_map, f"max_file_store {max_file / 1e9:.1f} GB does not fit the "
                     f"{volume / 1e9:.1f} GB volume")


def check_nats(where, by, nats_server, problems):
    sts = by.get("StatefulSet", {}).get("nats")
    config = by.get("ConfigMap", {}).get("millrace-config")
    if sts is None or config is None:
        problems.add(where, None, "no StatefulSet nats or ConfigMap millrace-config")
        return None, []
    servers = sts["spec"].get("replicas", 1)
    data = config.get("data", {})

    for url in data.get("MILLRACE_NATS_URL", "").split(","):
        url = url.strip()
        if not url:
            problems.add(where, config, "MILLRACE_NATS_URL is empty")
        else:
            check_endpoint(where, config, by, url, problems)

    raw = data.get("MILLRACE_STREAM_REPLICAS", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= min(servers, NATS_MAX_REPLICAS):
        problems.add(where, config, f"MILLRACE_STREAM_REPLICAS {raw!r} must be 1..{min(servers, NATS_MAX_REPLICAS)} "
                     f"for {servers} NATS server(s)")
    replicas = int(raw) if raw.isdigit() else None

    conf_map = by.get("ConfigMap", {}).get("nats-config")
    conf = (conf_map or {}).get("data", {}).get("nats.conf")
    if conf is None:
        problems.add(where, conf_map, "ConfigMap nats-config has no nats.conf")
        return replicas, []
    if replicas is not None:
        check_nats_storage(where, data, conf, conf_map, sts, replicas, servers, problems)
    # The routes must name every server: nats-<i>.<headless service>:6222.
    routes = set(re.findall(r"nats://([a-z0-9.-]+):6222", conf))
    want = {f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}" for i in range(servers)}
    if servers > 1 and routes != want:
        problems.add(where, conf_map, f"cluster routes {sorted(routes)} are not the servers {sorted(want)}")
    if servers == 1 and routes:
        problems.add(where, conf_map, f"one server, yet cluster routes {sorted(routes)}")

    # The file as it is, and with each documented option (a commented `# sync_interval: …`)
    # turned on, so that the option stays valid too.
    variants = {"as is": conf}
    for m in re.finditer(r"^(\s*)# (sync_interval: \S+)\s*$", conf, re.M):
        variants[m.group(2)] = conf.replace(m.group(0), m.group(1) + m.group(2))
    env = {e["name"]: e.get("value", "nats-0") for c in pod_spec(sts)["containers"]
           if c["name"] == "nats" for e in c.get("env", [])}
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, "POD_NAME": "nats-0"}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, text in variants.items():
            path = os.path.join(tmp, "nats.conf")
            with open(path, "w") as f:
                f.write(text)
            out = subprocess.run([nats_server, "-t", "-c", path], capture_output=True,
                                 text=True, env=run_env)
            if out.returncode != 0:
                problems.add(where, conf_map, f"`nats-server -t` refuses nats.conf ({variant}): "
                             f"{(out.stderr or out.stdout).strip()}")
    return replicas, list(variants)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--nats-server", required=True)
    ap.add_argument("--kubernetes-version", required=True)
    ap.add_argument("--keda-crd", required=True)
    ap.add_argument("kustomizations", nargs="+")
    args = ap.parse_args()

    crds = load_crd(args.keda_crd)
    problems = Problems()
    for path in args.kustomizations:
        objs = render(args.kubectl, path)
        by = index(objs)
        before = len(problems.items)
        validate_schemas(path, objs, args.kubernetes_version, crds, problems)
        check_services(path, by, problems)
        check_pdbs(path, by, problems)
        check_pods(path, by, problems)
        check_keda(path, by, problems)
        replicas, variants = check_nats(path, by, args.nats_server, problems)
        kinds = {}
        for o in objs:
            kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
        n_keda = kinds.get("ScaledObject", 0)
        nats = by.get("StatefulSet", {}).get("nats", {}).get("spec", {}).get("replicas", 1)
        status = "ok" if len(problems.items) == before else f"{len(problems.items) - before} problem(s)"
        print(f"[check-k8s] {path}: {len(objs)} objects ({len(objs) - n_keda} against Kubernetes "
              f"{args.kubernetes_version}, {n_keda} ScaledObjects against KEDA's CRD), "
              f"NATS {nats} servers, streams R{replicas}, nats-server -t on nats.conf "
              f"({' / '.join(variants)}): {status}")
    if problems.items:
        print(f"[check-k8s] FAIL: {len(problems.items)} problem(s):", file=sys.stderr)
        for p in problems.items:
            print(f"  {p}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
