#!/usr/bin/env python3
"""Runs a small Encore cluster on loopback and observes it the way a cluster
operator would; scripts/observe-check.sh builds what it needs and runs it.

1. Models: the cpu-demo overlay's own models-init.sh, with tiny sizes.
2. The cluster: redis-server on a free port, then encore-coordinator on it,
   encore-reward-server (joining the coordinator), encore-actor and
   encore-learner, each started with the configuration file the manifests
   ship (encore.toml from the rendered ConfigMap encore-config, its
   in-cluster hosts, ports and paths replaced by local ones).
3. A real Prometheus (Debian's) on the shipped deploy/prometheus/prometheus.yml,
   its Kubernetes discovery replaced by static targets that carry the
   metadata Kubernetes would give the cpu-demo overlay's pods, so that the
   shipped relabelling has to pick each process's admin port by itself.
4. A job: the shipped example spec is validated by the coordinator, then a
   tiny version of it (two stages, R then U) is submitted with
   `encore job submit` and runs to its end while Prometheus scrapes twice
   a second; the job client's watch must replay every step.
5. Checks: every process's /metrics passes `promtool check metrics`; every
   metric name in the dashboard's queries is exported by some process;
   Prometheus scrapes exactly the four processes; every dashboard query
   evaluates and (but for error rates) has data; the reward curve
   (encore_learner_reward_mean) has points over the run for each reward
   model and stage, moves, and ends on the values the job reported.
6. SIGTERM to each process: each must exit 0 within its pod's
   terminationGracePeriodSeconds.
"""

import argparse
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SCRAPE_CONFIG = REPO / "deploy/prometheus/prometheus.yml"
DASHBOARD = REPO / "deploy/grafana/dashboards/encore.json"
MODELS_INIT = REPO / "deploy/kubernetes/overlays/cpu-demo/models-init.sh"
EXAMPLE_JOB = REPO / "deploy/examples/job-cpu-demo.json"

# The processes, by the app.kubernetes.io/component of their pods, with
# their binary and the log line that carries their bound addresses.
ROLES = {
    "coordinator": ("encore-coordinator", "coordinator ready"),
    "reward-server": ("encore-reward-server", "reward server ready"),
    "actor": ("encore-actor", "actor starting"),
    "learner": ("encore-learner", "learner starting"),
}

# Series Prometheus makes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

started = time.monotonic()


def log(message):
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def wait_for(what, predicate, timeout_s, interval_s=0.1):
    """Polls predicate until it returns a true value, which it returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class Process:
    """A child process with its output in a log file."""

    def __init__(self, name, argv, work, env=None):
        self.name = name
        self.log_path = work / f"{name}.log"
        self.log_file = open(self.log_path, "w")
        self.popen = subprocess.Popen(
            argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=work,
        )

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def check_alive(self):
        if self.popen.poll() is not None:
            tail = "\n".join(self.log_text().splitlines()[-25:])
            fail(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def field(self, line_message, key):
        """A field of the JSON log line whose message is line_message."""
        self.check_alive()
        for line in self.log_text().splitlines():
            if line_message in line:
                match = re.search(rf'"{key}":"([^"]+)"', line)
                if match:
                    return match.group(1)
        return None

    def stop(self, grace_s):
        """SIGTERM, then the exit code if it came within grace_s (None if killed)."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return None


# --- the shipped pieces -----------------------------------------------------------------


def rendered(manifests):
    return [d for d in yaml.safe_load_all(Path(manifests).read_text()) if d]


def shipped_config(objects):
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("encore-config"):
            return obj["data"]["encore.toml"]
    fail("the rendered manifests hold no encore-config ConfigMap")


def localize(config, work, redis_port, coordinator_url, role):
    """encore.toml with its in-cluster addresses and paths made local: the
    shared volume and the Secret shared by all, every other path (each pod's
    own volumes) under a directory of the role's."""
    text = re.sub(r'"0\.0\.0\.0:\d+"', '"127.0.0.1:0"', config)
    text = text.replace("redis://encore-redis:6379/", f"redis://127.0.0.1:{redis_port}/")
    text = text.replace("http://encore-coordinator:50051", coordinator_url)
    text = text.replace('"/var/lib/encore/shared/', f'"{work}/shared/')
    text = text.replace('"/var/lib/encore/', f'"{work}/{role}/var/lib/encore/')
    text = text.replace('"/etc/encore/', f'"{work}/etc/encore/')
    leftover = re.findall(r"encore-[a-z-]+:\d+|\"/(?:var|etc)/[^\"]*\"", text)
    if leftover:
        fail(f"encore.toml refers to things this check cannot make local: {leftover}")
    return text


def pod_targets(objects, ports):
    """Static targets standing in for Kubernetes pod discovery: one per
    container port of each Encore process's pod template, with the meta
    labels Kubernetes would attach, at the local process's port for `admin`
    and at a closed port for any other (so that keeping one is noticed)."""

    def sanitize(name):
        return re.sub(r"[^a-zA-Z0-9_]", "_", name)

    groups = []
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template = obj["spec"]["template"]
        role = template["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if role not in ROLES:
            continue
        meta = {
            "__meta_kubernetes_namespace": obj["metadata"].get("namespace", ""),
            "__meta_kubernetes_pod_name": f"{obj['metadata']['name']}-local",
            "__meta_kubernetes_pod_ip": "127.0.0.1",
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_ready": "true",
        }
        for key, value in template["metadata"].get("labels", {}).items():
            meta[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = str(value)
            meta[f"__meta_kubernetes_pod_labelpresent_{sanitize(key)}"] = "true"
        for key, value in template["metadata"].get("annotations", {}).items():
            meta[f"__meta_kubernetes_pod_annotation_{sanitize(key)}"] = str(value)
            meta[f"__meta_kubernetes_pod_annotationpresent_{sanitize(key)}"] = "true"
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []):
                local = ports[role] if port.get("name") == "admin" else free_port()
                labels = dict(meta)
                labels.update({
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
                })
                groups.append({"targets": [f"127.0.0.1:{local}"], "labels": labels})
    return groups


def local_scrape_config(groups):
    """The shipped scrape configuration with static targets instead of the
    Kubernetes API, scraping twice a second; nothing else changed."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"].update(scrape_interval="500ms", scrape_timeout="500ms", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        if not job.pop("kubernetes_sd_configs", None):
            fail(f"scrape job {job['job_name']} does not discover Kubernetes pods")
        job["static_configs"] = groups
    return config


# --- the dashboard ----------------------------------------------------------------------


def dashboard_queries(dashboard):
    """(panel title, expr) of every query, and the variables' queries."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def variable_queries(dashboard):
    """name -> (metric, label) of label_values() variables."""
    out = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        if not match:
            fail(f"dashboard variable {var['name']}: {query!r} is not label_values(metric, label)")
        out[var["name"]] = (match.group(1), match.group(2))
    return out


PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "max", "min", "avg", "count",
    "histogram_quantile", "scalar", "vector", "on", "ignoring", "group_left",
    "group_right", "bool", "and", "or", "unless", "offset", "topk", "bottomk", "le",
}


def metric_names(expr):
    """The metric names an expression selects (identifiers not inside braces
    or brackets, not functions, keywords or label names)."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        word = match.group(0)
        following = bare[match.end():].lstrip()
        if word in PROMQL_WORDS or following.startswith("("):
            continue
        names.add(word)
    return names


# --- Prometheus ---------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url):
        self.url = url

    def api(self, path, **params):
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            status, body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=10)
        except urllib.error.HTTPError as e:
            # Bad requests (a query that does not parse) are failures of the
            # check, not something to wait out.
            fail(f"Prometheus refused {path} {params}: {e.read().decode()}")
        result = json.loads(body)
        if result.get("status") != "success":
            fail(f"Prometheus: {path} {params}: {result}")
        return result["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]


# --- the run --------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="directory of the Encore binaries")
    parser.add_argument("--work", required=True, help="scratch directory (emptied)")
    parser.add_argument("--gen", required=True, help="Python stubs generated from proto/")
    parser.add_argument("--manifests", required=True, help="the rendered cpu-demo overlay")
    parser.add_argument("--promtool", default="promtool")
    parser.add_argument("--prometheus", default="prometheus")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--steps", type=int, default=20, help="learner steps per stage")
    parser.add_argument("--timeout-s", type=float, default=180, help="longest wait for the job")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(args.gen).resolve()))
    import grpc
    from google.protobuf import json_format

    from encore.v1 import job_pb2, job_pb2_grpc

    bin_dir = Path(args.bin).resolve()
    work = Path(args.work).resolve()
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    objects = rendered(args.manifests)
    processes = {}
    stopped = []

    def cleanup():
        for p in processes.values():
            if p not in stopped and p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()

    try:
        # 1. Models, with the cpu-demo's own script.
        models = work / "shared/models"
        out = subprocess.run(
            ["sh", str(MODELS_INIT)],
            env={
                **os.environ,
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "ENCORE_MODELS_DIR": str(models),
                "ENCORE_SCRATCH_DIR": str(work / "scratch"),
                "DEMO_PRETRAIN_STEPS": "2",
                "DEMO_REWARD_RECORDS": "48",
                "DEMO_REWARD_EPOCHS": "1",
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0 or not (models / "READY").exists():
            fail(f"models-init.sh failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        log(f"models written by {MODELS_INIT.relative_to(REPO)}")

        # 2. The cluster.
        secrets_dir = work / "etc/encore/secrets"
        secrets_dir.mkdir(parents=True)
        for role in ("actor", "learner", "reward-server"):
            (secrets_dir / f"{role}-token").write_text(secrets.token_hex(16) + "\n")
        client_token = secrets.token_hex(16)
        (secrets_dir / "client-tokens").write_text(f"observe:{client_token}\n")
        redis_port = free_port()
        processes["redis"] = Process(
            "redis",
            [args.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            work,
        )

        def redis_pong():
            processes["redis"].check_alive()
            with socket.create_connection(("127.0.0.1", redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_for("redis-server", redis_pong, 30)

        config = shipped_config(objects)
        addresses = {}

        def start(role, coordinator_url):
            binary = ROLES[role][0]
            config_path = work / f"{role}.toml"
            config_path.write_text(localize(config, work, redis_port, coordinator_url, role))
            proc = Process(
                role,
                [str(bin_dir / binary), "--config", str(config_path), "--log-format", "json"],
                work,
            )
            processes[role] = proc
            return config_path

        # The coordinator reads only its own section; the workers' sections
        # get its address once it is known.
        start("coordinator", "http://127.0.0.1:1")
        grpc_addr = wait_for(
            "the coordinator's address",
            lambda: processes["coordinator"].field("coordinator ready", "grpc_addr"),
            60,
        )
        url = f"http://{grpc_addr}"
        # The reward server hosts the models the shipped file lists, from
        # the (local) shared volume.
        hosted = re.findall(r'name = "([^"]+)", path = "([^"]+)"',
                            localize(config, work, redis_port, url, "reward-server"))
        if not hosted:
            fail("encore.toml's [reward_server] hosts no model")
        start("reward-server", url)
        start("actor", url)
        start("learner", url)
        ports = {}
        for role, (_, ready_line) in ROLES.items():
            admin = wait_for(
                f"the {role}'s admin address",
                lambda role=role, line=ready_line: processes[role].field(line, "admin_addr"),
                120,
            )
            addresses[role] = admin
            ports[role] = int(admin.rsplit(":", 1)[1])
            wait_for(
                f"{role} /readyz",
                lambda admin=admin, role=role: (processes[role].check_alive(),
                                                http_get(f"http://{admin}/readyz")[0] == 200)[1],
                120,
            )
        log("cluster ready: " + ", ".join(f"{r} admin {a}" for r, a in addresses.items())
            + f"; coordinator gRPC {grpc_addr}; redis :{redis_port}; models {', '.join(n for n, _ in hosted)}")

        # 3. Prometheus on the shipped scrape configuration.
        prom_dir = work / "prometheus"
        prom_dir.mkdir()
        prom_config = prom_dir / "prometheus.yml"
        prom_config.write_text(yaml.safe_dump(local_scrape_config(pod_targets(objects, ports)), sort_keys=False))
        out = subprocess.run([args.promtool, "check", "config", str(prom_config)],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            fail(f"promtool check config:\n{out.stdout}{out.stderr}")
        prom_port = free_port()
        processes["prometheus"] = Process(
            "prometheus",
            [args.prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={prom_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            work,
        )
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_for("Prometheus /-/ready", lambda: (processes["prometheus"].check_alive(),
                                                 http_get(f"{prom.url}/-/ready")[0] == 200)[1], 120)

        def targets_up():
            data = prom.api("targets")
            active = data["activeTargets"]
            return (active, data["droppedTargets"]) if active and all(
                t["health"] == "up" for t in active) else None

        active, dropped = wait_for("every Prometheus target up", targets_up, 60, 0.25)
        roles = sorted(t["labels"].get("role", "?") for t in active)
        if roles != sorted(ROLES):
            fail(f"Prometheus scrapes {roles}, not one target per process {sorted(ROLES)}")
        for t in active:
            if t["labels"]["instance"] != t["labels"]["pod"]:
                fail(f"target {t['labels']}: instance is not the pod name")
        log(f"Prometheus {prom.url} scrapes {len(active)} targets ({', '.join(roles)}), "
            f"dropped {len(dropped)} other ports")

        # 4. The job: the example as shipped (validated only), then a tiny one.
        channel = grpc.insecure_channel(grpc_addr)
        jobs = job_pb2_grpc.JobServiceStub(channel)
        auth = [("authorization", f"Bearer {client_token}")]
        example = json_format.Parse(EXAMPLE_JOB.read_text(), job_pb2.JobSpec())
        jobs.Submit(job_pb2.SubmitJobRequest(idempotency_key="example", spec=example, validate_only=True),
                    metadata=auth, timeout=30)
        log(f"the coordinator accepts {EXAMPLE_JOB.relative_to(REPO)} as it is (validate_only)")
        spec = job_pb2.JobSpec()
        spec.CopyFrom(example)
        spec.base_checkpoint.uri = str(models / "base")
        spec.algorithm.samples_per_prompt = 2
        spec.algorithm.batch_size = 4
        spec.algorithm.sampling.max_new_tokens = 32
        spec.checkpoint_every_steps = 2
        for stage in spec.stages:
            stage.stop.max_steps = args.steps
        # Submitted with the job client docs/deploy.md shows.
        (work / "job.json").write_text(json_format.MessageToJson(spec))
        client = [str(bin_dir / "encore"), "job", "--coordinator", f"http://{grpc_addr}"]
        client_env = {**os.environ, "ENCORE_TOKEN": client_token}
        submitted = time.time()
        out = subprocess.run(client + ["submit", str(work / "job.json"), "--key", "observe"],
                             env=client_env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            fail(f"encore job submit:\n{out.stdout}{out.stderr}")
        job = job_pb2.Job(job_id=out.stdout.split()[0])
        log(f"submitted {job.job_id} with `encore job submit`: stages {[s.name for s in spec.stages]}, "
            f"{args.steps} steps each")

        points = []
        final = {}

        def follow():
            try:
                for event in jobs.Watch(job_pb2.WatchJobRequest(job_id=job.job_id, after_sequence=0),
                                        metadata=auth, timeout=args.timeout_s):
                    kind = event.WhichOneof("event")
                    if kind == "metrics":
                        points.append(event.metrics)
                    elif kind == "state_change":
                        final["state"] = event.state_change.state
                        final["message"] = event.state_change.message
            except grpc.RpcError as e:
                final["error"] = f"{e.code().name}: {e.details()}"

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        while watcher.is_alive():
            for p in processes.values():
                p.check_alive()
            # A process that logs an error has usually stopped the job; say
            # so now rather than at the watch's deadline.
            for role in ROLES:
                errors = [line for line in processes[role].log_text().splitlines()
                          if '"level":"ERROR"' in line]
                if errors:
                    fail(f"{role} logged an error while the job ran: {errors[0]}")
            watcher.join(0.5)
        if final.get("state") != job_pb2.JOB_STATE_SUCCEEDED:
            fail(f"job {job.job_id} did not succeed: {final}")
        if len(points) != args.steps * len(spec.stages):
            fail(f"the job reported {len(points)} steps, not {args.steps} in each of {len(spec.stages)} stages")
        last = {}
        for p in points:
            for model, stats in p.rewards.items():
                last[(p.stage, model)] = stats.mean
        log(f"job {job.job_id} SUCCEEDED after {len(points)} steps; last reward means "
            + ", ".join(f"{s}/{m} {v:.4f}" for (s, m), v in sorted(last.items())))
        out = subprocess.run(client + ["watch", job.job_id],
                             env=client_env, capture_output=True, text=True, timeout=60)
        (work / "watch.txt").write_text(out.stdout + out.stderr)
        steps_shown = len(re.findall(r"^step +\d+ \[", out.stdout, re.M))
        if out.returncode != 0 or steps_shown != len(points) or "state SUCCEEDED" not in out.stdout:
            fail(f"encore job watch (exit {out.returncode}, {steps_shown} steps shown):\n"
                 f"{out.stdout}{out.stderr}")
        log(f"`encore job watch` replays the {steps_shown} steps and the end")
        # The last step's gauges have been scraped once a scrape has started
        # after the job ended.
        end = time.time()
        wait_for("a scrape after the job ended", lambda: all(
            float(r["value"][1]) > end + 0.1 for r in prom.query('timestamp(up{job="encore"})')), 15, 0.25)

        # 5a. Every exposition, by promtool.
        exported = {}
        for role, admin in addresses.items():
            status, body = http_get(f"http://{admin}/metrics")
            (work / f"{role}.metrics").write_text(body)
            out = subprocess.run([args.promtool, "check", "metrics"], input=body,
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                fail(f"promtool check metrics on the {role}'s /metrics:\n{out.stdout}{out.stderr}")
            names = {line.split("{")[0].split(" ")[0] for line in body.splitlines()
                     if line and not line.startswith("#")}
            families = len([line for line in body.splitlines() if line.startswith("# TYPE")])
            for name in names:
                exported.setdefault(name, set()).add(role)
            log(f"promtool check metrics: {role} ok ({families} families, "
                f"{len([l for l in body.splitlines() if l and not l.startswith('#')])} samples)")
        foreign = sorted(n for n in exported if not n.startswith("encore_"))
        if foreign:
            fail(f"metrics outside the encore_ namespace: {foreign}")

        # 5b. Every metric the dashboard uses is exported.
        dashboard = json.loads(DASHBOARD.read_text())
        queries = dashboard_queries(dashboard)
        variables = variable_queries(dashboard)
        used = {}
        for title, expr in queries:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(title)
        for metric, _ in variables.values():
            used.setdefault(metric, set()).add("(variable)")
        missing = sorted(n for n in used if n not in exported and n not in SYNTHETIC)
        if missing:
            fail("the dashboard queries metrics no process exports: "
                 + "; ".join(f"{n} (in {sorted(used[n])})" for n in missing))
        by_role = {}
        for name in used:
            for role in exported.get(name, {"prometheus"}):
                by_role.setdefault(role, set()).add(name)
        log(f"the dashboard's {len(queries)} queries use {len(used)} metrics, all exported: "
            + "; ".join(f"{r} {len(n)}" for r, n in sorted(by_role.items())))

        # 5c. Every dashboard query, in Prometheus.
        values = {}
        for name, (metric, label) in variables.items():
            values[name] = prom.api(f"label/{label}/values", **{"match[]": metric})
        if job.job_id not in values.get("job", []):
            fail(f"the job variable offers {values.get('job')}, not {job.job_id}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", job.job_id):
            fail(f"job id {job.job_id!r} would need escaping in a PromQL regex")
        substitutions = {"job": job.job_id, "model": ".*", "__rate_interval": "15s"}
        empty = []
        for title, expr in queries:
            concrete = re.sub(r"\$\{?(\w+)\}?", lambda m: substitutions[m.group(1)], expr)
            if not prom.query(concrete) and 'code!="OK"' not in expr:
                empty.append(f"{title}: {concrete}")
        if empty:
            fail("dashboard queries without data:\n  " + "\n  ".join(empty))
        log(f"all {len(queries)} dashboard queries evaluate in Prometheus, with data "
            f"(variables: " + ", ".join(f"{k}={v}" for k, v in values.items()) + ")")

        # 5d. The reward curve: samples over the run, for every stage and
        # model of the job, and the latest of them the job's own values.
        selector = f'encore_learner_reward_mean{{job="{job.job_id}"}}'
        curve = prom.api("query_range", query=selector, start=f"{submitted:.3f}",
                         end=f"{time.time():.3f}", step="0.5")["result"]
        series = {(s["metric"].get("stage"), s["metric"].get("model")): s for s in curve}
        if set(series) != set(last):
            fail(f"reward curve series {sorted(series)} are not the job's {sorted(last)}")
        latest = {(s["metric"].get("stage"), s["metric"].get("model")): s for s in prom.query(selector)}
        for key, s in sorted(series.items()):
            labels = s["metric"]
            if labels.get("role") != "learner" or labels.get("job") != job.job_id:
                fail(f"reward curve series {labels} lacks role=learner or job={job.job_id}")
            value = float(latest[key]["value"][1])
            if not math.isclose(value, last[key], rel_tol=1e-12, abs_tol=1e-12):
                fail(f"{key}: Prometheus's latest reward mean {value} is not the job's {last[key]}")
        moving = [k for k, s in series.items() if len({v for _, v in s["values"]}) > 1]
        if not moving:
            fail("the reward curve never changed while the job ran: "
                 + str({k: s["values"] for k, s in series.items()}))
        log("reward curve encore_learner_reward_mean: "
            + ", ".join(f"{s}/{m} {len(v['values'])} points ({len({x for _, x in v['values']})} distinct)"
                        for (s, m), v in sorted(series.items()))
            + "; the latest values are the job's own")

        # 6. Graceful termination.
        channel.close()
        # Each within its pod's terminationGracePeriodSeconds.
        graces = {}
        for obj in objects:
            if obj["kind"] in ("Deployment", "StatefulSet"):
                template = obj["spec"]["template"]
                role = template["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                if role in ROLES:
                    graces[role] = template["spec"]["terminationGracePeriodSeconds"]
        for role in ("actor", "learner", "reward-server", "coordinator"):
            grace = graces[role]
            t = time.monotonic()
            code = processes[role].stop(grace)
            stopped.append(processes[role])
            if code != 0:
                fail(f"{role} did not exit cleanly on SIGTERM within {grace} s (exit {code})")
            log(f"{role} exited 0 on SIGTERM in {time.monotonic() - t:.1f} s")
        for name in ("prometheus", "redis"):
            processes[name].stop(10)
            stopped.append(processes[name])
        print(f"OK: observe-check passed in {time.monotonic() - started:.0f} s")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
