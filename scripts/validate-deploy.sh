#!/usr/bin/env bash
# Validates the deployment artefacts without a Docker engine or a cluster:
#
#   1. docker-compose config     examples/docker-compose/docker-compose.yml (Debian's docker-compose v1)
#   2. yamllint --strict         examples/ and k8s/ (rules in examples/.yamllint, k8s/.yamllint)
#   3. promtool                  the Prometheus config, and every Grafana dashboard query as PromQL
#   4. Kubernetes                k8s/ rendered like `kubectl kustomize` (with and without the
#                                prometheus-operator component), every object validated with
#                                `kubernetes-validate --strict` (bundled schemas, offline) for the
#                                oldest supported (1.30) and the newest known Kubernetes, the
#                                ServiceMonitor checked structurally, and cross-checks between the
#                                manifests and outrider.yaml (ports, probes, mount, shutdown budget)
#   5. compose cross-checks      mounts exist, scrape target and admin port agree, dashboard datasources
#   6. Dockerfile lint           stages, dependency layer, non-root USER, EXPOSE, ENTRYPOINT/CMD,
#                                no HEALTHCHECK, .dockerignore (dockerfile-parse; hadolint is not
#                                installable here)
#
# `outrider check` on the shipped configs runs in the Rust tests (tests/shipped_configs.rs).
# Exits non-zero on any problem. Run from anywhere; installs missing tools (apt, pip) first.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- tools -------------------------------------------------------------------------------
apt_pkgs=()
command -v docker-compose >/dev/null 2>&1 || apt_pkgs+=(docker-compose)
command -v yamllint >/dev/null 2>&1 || apt_pkgs+=(yamllint)
command -v promtool >/dev/null 2>&1 || apt_pkgs+=(prometheus)   # promtool ships in Debian's prometheus
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  echo "validate-deploy: installing ${apt_pkgs[*]} with apt"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi
if ! "$PY" -c 'import kubernetes_validate, dockerfile_parse, yaml' >/dev/null 2>&1; then
  scripts/install-python-deps.sh
fi

failures=0
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- 1. docker-compose -------------------------------------------------------------------
step "docker-compose config (examples/docker-compose/docker-compose.yml)"
# The compose file requires the admin token from the environment; any value renders it.
if OUTRIDER_ADMIN_TOKEN="${OUTRIDER_ADMIN_TOKEN:-validate-deploy}" \
  docker-compose -f examples/docker-compose/docker-compose.yml config -q; then
  echo "ok"
else
  fail "docker-compose config"
fi

# --- 2. yamllint -------------------------------------------------------------------------
step "yamllint --strict examples/ k8s/"
if yamllint --strict -c examples/.yamllint examples/ && yamllint --strict -c k8s/.yamllint k8s/; then
  echo "ok"
else
  fail "yamllint"
fi

# --- 3. promtool -------------------------------------------------------------------------
step "promtool: Prometheus config and dashboard queries"
promtool check config --syntax-only examples/docker-compose/prometheus/prometheus.yml || fail "promtool check config"
promtool check rules examples/docker-compose/prometheus/slo-rules.yml || fail "promtool check rules (SLO rules)"
# Each dashboard query becomes a recording rule so promtool parses it as PromQL; Grafana's
# variables are replaced by values they can take.
if "$PY" - "$WORK/dashboard-rules.yml" examples/docker-compose/grafana/dashboards/*.json <<'PY'
import json, sys, yaml
out, files = sys.argv[1], sys.argv[2:]
rules = []
for path in files:
    dash = json.load(open(path))
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(dash.get("panels", [])):
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$route", ".*")
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
if not rules:
    sys.exit("no dashboard queries found")
yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, open(out, "w"))
PY
then
  promtool check rules "$WORK/dashboard-rules.yml" || fail "dashboard PromQL"
else
  fail "could not extract dashboard queries"
fi

# --- 4.–6. Kubernetes, compose cross-checks, Dockerfile ----------------------------------
step "Kubernetes manifests, compose cross-checks, Dockerfiles"
if ! "$PY" - "$WORK" <<'PY'
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml
from dockerfile_parse import DockerfileParser

WORK = sys.argv[1]
errors = []


def err(msg):
    errors.append(msg)
    print(f"  error: {msg}")


def ok(msg):
    print(f"  ok: {msg}")


def duration_s(text):
    """humantime subset used in the configs: 500ms, 15s, 5m, 1h."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", str(text))
    if not m:
        raise ValueError(f"unparsable duration {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def size_bytes(text):
    """Kubernetes quantities (Mi, Gi, M, G) and outrider sizes (MiB, GiB, MB, KiB...)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", str(text))
    if not m:
        raise ValueError(f"unparsable size {text!r}")
    unit = m.group(2) or ""
    power = " KMGT".index(unit[0]) if unit else 0
    return float(m.group(1)) * ((1024 if unit.endswith("i") else 1000) ** power)


def port_of(listen):
    return int(str(listen).rsplit(":", 1)[1])


def admin_exposed_without_token(admin_cfg):
    """outrider refuses a non-loopback admin.listen without admin.token or admin.token_file."""
    host = str(admin_cfg.get("listen", "127.0.0.1:9901")).rsplit(":", 1)[0].strip("[]")
    loopback = host.startswith("127.") or host == "::1"
    return not loopback and not admin_cfg.get("token") and not admin_cfg.get("token_file")


def host_allowed(host, admin_cfg):
    """outrider's admin Host check: IP literals, localhost, or admin.allowed_hosts."""
    import ipaddress
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return host.lower() in ["localhost"] + [h.lower() for h in admin_cfg.get("allowed_hosts", [])]


# ---------------------------------------------------------------- kustomize (subset)
KNOWN_KEYS = {"apiVersion", "kind", "labels", "resources", "components",
              "configMapGenerator", "generatorOptions", "images"}


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def render(kdir, extra_components=()):
    """Render a kustomization the way `kubectl kustomize` does, for the features used here.
    Unknown kustomization fields are an error, so this cannot silently drift."""
    k = load_docs(os.path.join(kdir, "kustomization.yaml"))[0]
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise SystemExit(f"{kdir}/kustomization.yaml: fields this validator does not render: {sorted(unknown)}")
    objs = []
    for res in k.get("resources", []):
        p = os.path.join(kdir, res)
        objs += render(p) if os.path.isdir(p) else load_docs(p)
    opts = k.get("generatorOptions", {})
    for gen in k.get("configMapGenerator", []):
        data = {}
        for entry in gen.get("files", []):
            key, _, src = entry.rpartition("=") if "=" in entry else (os.path.basename(entry), "", entry)
            with open(os.path.join(kdir, src)) as f:
                data[key] = f.read()
        name = gen["name"]
        if not opts.get("disableNameSuffixHash"):
            name += "-<hash>"
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        objs.append(cm)
    for comp in list(k.get("components", [])) + list(extra_components):
        cdir = os.path.join(kdir, comp)
        c = load_docs(os.path.join(cdir, "kustomization.yaml"))[0]
        if c.get("kind") != "Component":
            raise SystemExit(f"{cdir}: not a kustomize Component")
        for res in c.get("resources", []):
            objs += load_docs(os.path.join(cdir, res))
    for lab in k.get("labels", []):
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(lab.get("pairs", {}))
            if lab.get("includeSelectors"):
                raise SystemExit("labels.includeSelectors is not rendered by this validator")
    images = {i["name"]: i for i in k.get("images", [])}
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name, _, tag = c["image"].partition(":")
            if name in images:
                i = images[name]
                c["image"] = f"{i.get('newName', name)}:{i.get('newTag', tag or 'latest')}"
    return objs


components = sorted(
    d for d in os.listdir("k8s")
    if os.path.isfile(os.path.join("k8s", d, "kustomization.yaml"))
    and load_docs(os.path.join("k8s", d, "kustomization.yaml"))[0].get("kind") == "Component"
)
base = render("k8s")
full = render("k8s", components)
ok(f"rendered k8s/ ({len(base)} objects) and with components {components} ({len(full)} objects)")

# Cross-check the renderer against kubectl where a working kubectl is at hand.
try:
    out = subprocess.run(["kubectl", "kustomize", "k8s"], capture_output=True, text=True, timeout=60)
    if out.returncode == 0:
        theirs = sorted((o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(out.stdout) if o)
        ours = sorted((o["kind"], o["metadata"]["name"]) for o in base)
        if theirs != ours:
            err(f"kubectl kustomize renders {theirs}, this validator {ours}")
        else:
            ok("kubectl kustomize renders the same objects")
except (FileNotFoundError, subprocess.TimeoutExpired):
    pass

core = [o for o in full if not o["apiVersion"].startswith("monitoring.coreos.com/")]
crd = [o for o in full if o["apiVersion"].startswith("monitoring.coreos.com/")]
rendered = os.path.join(WORK, "k8s-rendered.yaml")
with open(rendered, "w") as f:
    yaml.safe_dump_all(core, f, sort_keys=False)

# Native sidecars need 1.29, the preStop sleep handler 1.30; also the newest bundled schema.
from kubernetes_validate.utils import latest_version
for version in ("1.30.0", latest_version()):
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                        "-k", version, rendered], capture_output=True, text=True)
    if r.returncode != 0:
        err(f"kubernetes-validate {version}:\n{r.stdout}{r.stderr}")
    else:
        ok(f"kubernetes-validate --strict against {version}: {len(core)} objects")

by_kind = {}
for o in full:
    by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# PrometheusRule (SLO rules from `outrider slo-rules`): its groups must pass promtool.
for pr in [c for c in crd if c.get("kind") == "PrometheusRule"]:
    name = pr["metadata"].get("name")
    if pr.get("apiVersion") != "monitoring.coreos.com/v1" or set(pr.get("spec", {})) != {"groups"}:
        err(f"PrometheusRule {name}: expected monitoring.coreos.com/v1 with spec.groups only")
        continue
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": pr["spec"]["groups"]}, f)
    checked = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    if checked.returncode != 0:
        err(f"PrometheusRule {name}: promtool check rules failed: {checked.stdout}{checked.stderr}")
    else:
        ok(f"PrometheusRule {name}: {sum(len(g['rules']) for g in pr['spec']['groups'])} rules pass promtool")
crd = [c for c in crd if c.get("kind") != "PrometheusRule"]

# ServiceMonitor: structural check (no bundled schema for the CRD).
for sm in crd:
    name = sm["metadata"].get("name")
    if sm.get("kind") != "ServiceMonitor" or sm.get("apiVersion") != "monitoring.coreos.com/v1":
        err(f"unexpected custom resource {sm.get('apiVersion')}/{sm.get('kind')}")
        continue
    spec = sm.get("spec", {})
    unknown = set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"}
    if unknown:
        err(f"ServiceMonitor {name}: unknown spec fields {sorted(unknown)}")
    svcs = [s for s in by_kind.get("Service", {}).values()
            if selects(spec.get("selector", {}).get("matchLabels", {}), s["metadata"].get("labels", {}))]
    if len(svcs) != 1:
        err(f"ServiceMonitor {name}: selector matches {len(svcs)} Services, expected 1")
        continue
    ports = {p.get("name") for p in svcs[0]["spec"]["ports"]}
    for ep in spec.get("endpoints", []):
        if ep.get("port") not in ports:
            err(f"ServiceMonitor {name}: endpoint port {ep.get('port')!r} not in Service {svcs[0]['metadata']['name']} ports {sorted(ports)}")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not re.fullmatch(r"\d+(ms|s|m|h)", ep[key]):
                err(f"ServiceMonitor {name}: bad {key} {ep[key]!r}")
    if not spec.get("endpoints"):
        err(f"ServiceMonitor {name}: no endpoints")
    else:
        ok(f"ServiceMonitor {name} selects Service {svcs[0]['metadata']['name']} port {spec['endpoints'][0]['port']}")

# The sidecar deployment against outrider.yaml.
deployments = [d for d in by_kind.get("Deployment", {}).values()
               if any(c.get("restartPolicy") == "Always" for c in d["spec"]["template"]["spec"].get("initContainers", []))]
if len(deployments) != 1:
    err(f"expected exactly one Deployment with an outrider native sidecar, found {len(deployments)}")
for dep in deployments:
    dname = dep["metadata"]["name"]
    pod = dep["spec"]["template"]
    pspec = pod["spec"]
    sidecar = next(c for c in pspec["initContainers"] if c.get("restartPolicy") == "Always")
    args = sidecar.get("args", []) + sidecar.get("command", [])
    if "--config" not in args:
        err(f"{dname}: outrider has no --config argument")
        continue
    cfg_path = args[args.index("--config") + 1]
    mount = next((m for m in sidecar.get("volumeMounts", []) if cfg_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    if mount is None:
        err(f"{dname}: --config {cfg_path} is not under any volumeMount")
        continue
    if "subPath" in mount or "subPathExpr" in mount:
        err(f"{dname}: config mount uses subPath; ConfigMap updates would never reach outrider")
    vol = next((v for v in pspec.get("volumes", []) if v["name"] == mount["name"]), {})
    cm_name = vol.get("configMap", {}).get("name")
    cm = by_kind.get("ConfigMap", {}).get(cm_name)
    key = os.path.relpath(cfg_path, mount["mountPath"])
    if cm is None or key not in cm.get("data", {}):
        err(f"{dname}: ConfigMap {cm_name!r} with key {key!r} not rendered")
        continue
    cfg = yaml.safe_load(cm["data"][key])
    ok(f"{dname}: outrider reads {cfg_path} from ConfigMap {cm_name} mounted as a directory")

    ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    if ports.get("http") != port_of(cfg["listen"]):
        err(f"{dname}: container port http={ports.get('http')} but outrider listen is {cfg['listen']}")
    admin = cfg.get("admin", {}).get("listen", "127.0.0.1:9901")
    if ports.get("admin") != port_of(admin):
        err(f"{dname}: container port admin={ports.get('admin')} but admin.listen is {admin}")
    if not admin.startswith("0.0.0.0:"):
        err(f"{dname}: admin.listen {admin} is not reachable by the kubelet probes (use 0.0.0.0)")
    admin_cfg = cfg.get("admin", {})
    if admin_exposed_without_token(admin_cfg):
        err(f"{dname}: admin.listen {admin} needs admin.token or admin.token_file")
    token_file = admin_cfg.get("token_file")
    if token_file:
        tmount = next((m for m in sidecar.get("volumeMounts", [])
                       if token_file.startswith(m["mountPath"].rstrip("/") + "/")), None)
        if tmount is None:
            err(f"{dname}: admin.token_file {token_file} is not under any volumeMount")
        else:
            if "subPath" in tmount or "subPathExpr" in tmount:
                err(f"{dname}: admin token mount uses subPath; a rotated Secret would never reach outrider")
            tvol = next((v for v in pspec.get("volumes", []) if v["name"] == tmount["name"]), {})
            sname = tvol.get("secret", {}).get("secretName")
            secret = by_kind.get("Secret", {}).get(sname)
            tkey = os.path.relpath(token_file, tmount["mountPath"])
            keys = set((secret or {}).get("data") or {}) | set((secret or {}).get("stringData") or {})
            if secret is None or tkey not in keys:
                err(f"{dname}: admin.token_file {token_file}: Secret {sname!r} with key {tkey!r} not rendered")
            else:
                ok(f"{dname}: admin token read from Secret {sname} key {tkey}, mounted as a directory")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
        get = sidecar.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("admin", ports.get("admin")):
            err(f"{dname}: outrider {probe} should be GET {path} on the admin port, is {get}")
    ann = pod["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(ports.get("admin")):
        err(f"{dname}: prometheus.io scrape annotations do not point at the admin port")

    prestop = max((c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                   for c in pspec["containers"] + pspec["initContainers"]), default=0)
    grace = duration_s(cfg.get("shutdown", {}).get("grace_period", "25s"))
    tgps = pspec.get("terminationGracePeriodSeconds", 30)
    if tgps <= grace + prestop:
        err(f"{dname}: terminationGracePeriodSeconds {tgps} must exceed shutdown.grace_period {grace}s + preStop {prestop}s")
    else:
        ok(f"{dname}: terminationGracePeriodSeconds {tgps} > grace_period {grace:g}s + preStop {prestop}s")

    # The L1 cache lives inside the container's memory limit, next to a ~40Mi baseline.
    limit = sidecar.get("resources", {}).get("limits", {}).get("memory")
    cache_max = cfg.get("cache", {}).get("memory", {}).get("max_size", "256MiB")
    if limit is None:
        err(f"{dname}: outrider has no memory limit")
    elif size_bytes(limit) < size_bytes(cache_max) + 64 * 2**20:
        err(f"{dname}: outrider memory limit {limit} leaves under 64Mi above cache.memory.max_size {cache_max}")
    else:
        ok(f"{dname}: memory limit {limit} covers cache.memory.max_size {cache_max} + baseline")

    up = cfg["upstreams"]["app"]["url"]
    app = pspec["containers"][0]
    app_cmd = " ".join(app.get("command", []) + app.get("args", []))
    up_port = port_of(up.split("//", 1)[1].split("/", 1)[0])
    if f"--port={up_port}" not in app_cmd and f"--port {up_port}" not in app_cmd:
        err(f"{dname}: upstream {up} but the app container does not listen on port {up_port} ({app_cmd})")

    # Traffic Service targets outrider, not the app.
    traffic = [s for s in by_kind.get("Service", {}).values()
               if selects(s["spec"].get("selector", {}), pod["metadata"]["labels"]) and s["spec"].get("clusterIP") != "None"]
    if not traffic:
        err(f"{dname}: no Service selects the pod")
    for s in traffic:
        for p in s["spec"]["ports"]:
            if p["targetPort"] not in ("http", ports.get("http")):
                err(f"Service {s['metadata']['name']} targets {p['targetPort']}, not outrider's http port")
    if traffic:
        ok(f"Service {traffic[0]['metadata']['name']} targets outrider's http port")

    env = {e["name"]: e.get("value", "") for e in sidecar.get("env", [])}
    redis_url = env.get("REDIS_URL", "")
    m = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", redis_url)
    if m:
        host, rport = m.group(1), int(m.group(2) or 6379)
        svc = by_kind.get("Service", {}).get(host)
        if svc is None or rport not in [p["port"] for p in svc["spec"]["ports"]]:
            err(f"{dname}: REDIS_URL {redis_url} does not match a rendered Service")

# ---------------------------------------------------------------- docker-compose cross-checks
CD = "examples/docker-compose"
compose = yaml.safe_load(open(f"{CD}/docker-compose.yml"))
svcs = compose["services"]
for sname, svc in svcs.items():
    for vol in svc.get("volumes", []):
        src = vol.split(":", 1)[0]
        if src.startswith((".", "/")) and not os.path.exists(os.path.join(CD, src)):
            err(f"compose service {sname}: volume source {src} does not exist")
    build = svc.get("build")
    if build:
        ctx = os.path.join(CD, build.get("context", "."))
        if not os.path.isfile(os.path.join(ctx, build.get("dockerfile", "Dockerfile"))):
            err(f"compose service {sname}: Dockerfile {build.get('dockerfile')} not found in {ctx}")
o = svcs["outrider"]
cmd = o.get("command", [])
cfg_path = cmd[cmd.index("--config") + 1]
mount = next((v for v in o.get("volumes", []) if cfg_path.startswith(v.split(":")[1].rstrip("/") + "/")), None)
if mount is None:
    err(f"compose outrider: --config {cfg_path} is not under a mounted directory")
else:
    host_dir = os.path.join(CD, mount.split(":")[0])
    host_file = os.path.join(host_dir, os.path.relpath(cfg_path, mount.split(":")[1]))
    if not os.path.isdir(host_dir) or not os.path.isfile(host_file):
        err(f"compose outrider: {host_file} must be a file inside a bind-mounted directory")
    else:
        ccfg = yaml.safe_load(open(host_file))
        admin_port = port_of(ccfg["admin"]["listen"])
        if not ccfg["admin"]["listen"].startswith("0.0.0.0:"):
            err("compose outrider: admin.listen must be 0.0.0.0:<port> for Prometheus to scrape it")
        prom = yaml.safe_load(open(f"{CD}/prometheus/prometheus.yml"))
        targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
        if f"outrider:{admin_port}" not in targets:
            err(f"prometheus.yml does not scrape outrider:{admin_port} ({targets})")
        for t in targets:
            if t.endswith(f":{admin_port}") and not host_allowed(t.rsplit(":", 1)[0], ccfg["admin"]):
                err(f"prometheus.yml scrapes {t}, a Host that admin.allowed_hosts does not allow (421)")
        if admin_exposed_without_token(ccfg["admin"]):
            err("compose outrider: admin.listen is not loopback but there is no admin.token or admin.token_file")
        token_var = re.fullmatch(r"\$\{(\w+)(:-[^}]*)?\}", str(ccfg["admin"].get("token", "")))
        if token_var and token_var.group(1) not in (o.get("environment") or {}):
            err(f"compose outrider: admin.token reads ${{{token_var.group(1)}}}, which the service's environment does not set")
        grace = duration_s(ccfg.get("shutdown", {}).get("grace_period", "25s"))
        if duration_s(o.get("stop_grace_period", "10s")) <= grace:
            err(f"compose outrider: stop_grace_period must exceed shutdown.grace_period {grace:g}s")
        upstream = ccfg["upstreams"]["app"]["url"]
        if not re.match(r"https?://app:\d+", upstream):
            err(f"compose outrider: upstream {upstream} is not the app service")
        ok(f"compose: {host_file} mounted as a directory, admin :{admin_port} scraped, upstream {upstream}")
ds_uids = set()
for f in os.listdir(f"{CD}/grafana/provisioning/datasources"):
    for d in yaml.safe_load(open(f"{CD}/grafana/provisioning/datasources/{f}"))["datasources"]:
        ds_uids.add(d["uid"])
for f in os.listdir(f"{CD}/grafana/dashboards"):
    dash = json.load(open(f"{CD}/grafana/dashboards/{f}"))
    used = {p["datasource"]["uid"] for p in dash["panels"] if isinstance(p.get("datasource"), dict)}
    if not used <= ds_uids:
        err(f"dashboard {f} uses datasource uids {sorted(used - ds_uids)} that are not provisioned")
    else:
        ok(f"dashboard {f}: {len(dash['panels'])} panels on provisioned datasource(s) {sorted(used)}")

# ---------------------------------------------------------------- Dockerfiles


def stages(path):
    parser = DockerfileParser(path=path)
    out = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            out.append({"from": ins["value"], "ins": []})
        elif out:
            out[-1]["ins"].append((ins["instruction"], ins["value"]))
    return parser, out


def exec_form(value):
    try:
        v = json.loads(value)
        return v if isinstance(v, list) else None
    except ValueError:
        return None


parser, st = stages("Dockerfile")
if len(st) < 2:
    err(f"Dockerfile: expected a multi-stage build, found {len(st)} stage(s)")
else:
    build, final = st[0], st[-1]
    runs = [v for i, v in build["ins"] if i == "RUN"]
    if not any("cmake" in r and "apt-get install" in r for r in runs):
        err("Dockerfile: build stage does not install cmake (pingora-core needs it)")
    seq = [(i, v) for i, v in build["ins"] if i in ("COPY", "RUN")]
    idx_manifest = next((n for n, (i, v) in enumerate(seq) if i == "COPY" and "Cargo.toml" in v and "Cargo.lock" in v), None)
    idx_deps = next((n for n, (i, v) in enumerate(seq) if i == "RUN" and "cargo build" in v), None)
    idx_src = next((n for n, (i, v) in enumerate(seq) if i == "COPY" and re.search(r"(^|\s)(\.|src)(/)?\s", v + " ") and "Cargo.toml" not in v), None)
    if None in (idx_manifest, idx_deps, idx_src) or not idx_manifest < idx_deps < idx_src:
        err("Dockerfile: dependencies must be built from Cargo.toml/Cargo.lock in a layer before the sources are copied")
    # A [patch] path (vendor/…) belongs to the dependency graph: copied before it is built.
    patched = sorted(set(re.findall(r'path\s*=\s*"(vendor/[^"]+)"', open("Cargo.toml").read())))
    for path in patched:
        idx_vendor = next((n for n, (i, v) in enumerate(seq) if i == "COPY" and v.split()[0] in ("vendor", "vendor/", path)), None)
        if idx_vendor is None or idx_deps is None or not idx_vendor < idx_deps:
            err(f"Dockerfile: the patched dependency {path} must be copied before the dependency layer is built")
    users = [v for i, v in final["ins"] if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        err(f"Dockerfile: final stage must switch to a non-root USER (found {users})")
    exposed = " ".join(v for i, v in final["ins"] if i == "EXPOSE").split()
    for port in ("8080", "9901"):
        if port not in exposed:
            err(f"Dockerfile: EXPOSE {port} missing (found {exposed})")
    ep = [v for i, v in final["ins"] if i == "ENTRYPOINT"]
    if not ep or exec_form(ep[-1]) != ["outrider"]:
        err(f'Dockerfile: ENTRYPOINT must be ["outrider"] (found {ep})')
    cmd = [v for i, v in final["ins"] if i == "CMD"]
    if not cmd or exec_form(cmd[-1]) != ["run", "--config", "/etc/outrider/outrider.yaml"]:
        err(f"Dockerfile: CMD must be run --config /etc/outrider/outrider.yaml (found {cmd})")
    if any(i == "HEALTHCHECK" for s in st for i, _ in s["ins"]):
        err("Dockerfile: no HEALTHCHECK: orchestrators probe /health and /ready on the admin port")
    copies = [v for i, v in final["ins"] if i == "COPY"]
    if not any(c.split()[-1] == "/etc/outrider/outrider.yaml" and "config/outrider.yaml" in c for c in copies):
        err("Dockerfile: the default config/outrider.yaml must be baked in at /etc/outrider/outrider.yaml")
    for c in copies:
        parts = [p for p in c.split() if not p.startswith("--")]
        if "--from" in c:
            continue
        for src in parts[:-1]:
            if not os.path.exists(src):
                err(f"Dockerfile: COPY source {src} does not exist in the build context")
    for f in ("Cargo.lock", "src/main.rs", "src/lib.rs"):
        if not os.path.exists(f):
            err(f"Dockerfile: build needs {f}")
    if not errors:
        ok(f"Dockerfile: {len(st)} stages ({', '.join(s['from'] for s in st)}), non-root USER {users[-1]}, "
           f"EXPOSE {' '.join(exposed)}, ENTRYPOINT/CMD as documented, no HEALTHCHECK")
ignore = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
for must in ("target/", ".git/"):
    if must not in ignore:
        err(f".dockerignore must exclude {must}")
for needed in ("src", "config", "vendor", "Cargo.toml", "Cargo.lock"):
    if any(p.rstrip("/") == needed for p in ignore):
        err(f".dockerignore excludes {needed}, which the build needs")

_, app_st = stages("examples/fastapi-backend/Dockerfile")
users = [v for s in app_st for i, v in s["ins"] if i == "USER"]
if not users or users[-1].split(":")[0] in ("root", "0"):
    err("examples/fastapi-backend/Dockerfile: must run as a non-root USER")
for s in app_st:
    for i, v in s["ins"]:
        if i == "COPY" and "--from" not in v:
            for src in v.split()[:-1]:
                if not os.path.exists(os.path.join("examples", src)):
                    err(f"examples/fastapi-backend/Dockerfile: COPY source examples/{src} missing")

sys.exit(1 if errors else 0)
PY
then
  fail "manifest checks (see errors above)"
fi

echo
if [ "$failures" -gt 0 ]; then
  echo "validate-deploy: $failures check(s) FAILED"
  exit 1
fi
echo "validate-deploy: all checks passed"
