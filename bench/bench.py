#!/usr/bin/env python3
"""Benchmark orchestration for miralix-gateway against nginx proxy_cache (run by bench/run.sh).

Starts the simulated box, nginx (caching proxy + static-file reference) and the gateway on
loopback, pins the servers to one CPU and the load generator to the other, runs the scenarios in
alternating rounds, and writes bench/results/latest.{json,md}, bench/results/ratios.png and the
results section of bench/README.md.
"""

import datetime
import json
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RESULTS = os.path.join(BENCH, "results")
# The gateway binary measured: bench/run.sh points this at the profile-guided build of
# bench/pgo.py when it can make one, and says which build it was in the results.
BIN = os.environ.get("BENCH_GATEWAY") or os.path.join(ROOT, "target/release/miralix-gateway")
BUILD = os.environ.get("BENCH_GATEWAY_BUILD", "release")
PROBE = os.environ.get("BENCH_PROBE") or os.path.join(ROOT, "target/release/examples/probe")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
# Equal offered load: these shares of the slowest server's saturated rate, open loop. The
# goals on CPU per request rest on these runs, and a 5 s run varies by about 10% on a noisy
# host, so they get more rounds than the rest: a median of 9 moves less than one of 5.
EQ_SHARES = (0.25, 0.5, 0.75)
EQ_ROUNDS = int(os.environ.get("BENCH_EQ_ROUNDS", "9"))
EQ_SECONDS = float(os.environ.get("BENCH_EQ_SECONDS", "5"))
# A round whose load generator used this much of its core or more is marked: it may have
# been the generator, not the server, that set the pace.
LOADGEN_BUSY = 0.95
# A run in which the host (the hypervisor) took this share of either benchmark core or more is
# marked as contended: steal time in /proc/stat, time the core ran someone else's work.
STOLEN = 0.05
DURATION = os.environ.get("BENCH_DURATION", "10s")
# A new connection for each request (wrk with `Connection: close`): shorter runs, since every
# request leaves a connection in TIME_WAIT on the servers' side.
CLOSE_DURATION = os.environ.get("BENCH_CLOSE_DURATION", "5s")
CONNECTIONS = 64
STORM = 500
STORM_DELAY_MS = 300
OUTAGE_SECONDS = int(os.environ.get("BENCH_OUTAGE_SECONDS", "60"))
OUTAGE_KEYS = 20
MISSES = 500
FILL_AGENTS = 10_000
FILL_UNKNOWN = 20_000
# The memory scenario's cache bound, small enough that both floods go through evictions.
MEMORY_MAX_BYTES_MIB = 64
SERVER_CPU, LOAD_CPU = "0", "1"
ACCOUNT = "greenbox"
# The cache endpoints need an admin token (the poller scenario refreshes through them).
ADMIN_TOKEN = "bench-admin-token-0123456789"
SECRET = "bench-secret-7c41"
HIT_PATH = f"/mot/{ACCOUNT}/agents/id/103/recordings"
ID_TEMPLATE = f"/mot/{ACCOUNT}/agents/id/{{n}}/recordings"
# A recording's audio (`{n}` its QueueCallId).
AUDIO_TEMPLATE = f"/mot/{ACCOUNT}/queues/calls/recordings/{{n}}"
FIRST_SYNTHETIC = 1_000_000
TTL, NEGATIVE_TTL = "10m", "5s"
POLL_SECONDS = int(os.environ.get("BENCH_POLL_SECONDS", "40"))
POLL_AGENTS, POLLERS_PER_AGENT, POLL_TTL_S = 10, 5, 5
NEW_CALL_EVERY_S = 0.5


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A process pinned to a CPU, logging to a file in the work directory."""

    def __init__(self, name, cmd, work, cpu=SERVER_CPU, env=None):
        self.name = name
        self.log_path = os.path.join(work, f"{name}.log")
        self.log = open(self.log_path, "w")
        # taskset execs the command, so the pid is the server's own.
        self.proc = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def cpu_pid(self):
        """The process doing the work: nginx's single worker, or the server itself."""
        children = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        if self.name == "nginx" and os.path.exists(children):
            with open(children) as f:
                pids = f.read().split()
            if pids:
                return int(pids[0])
        return self.proc.pid

    def cpu_split(self):
        """CPU seconds so far in user space and in the kernel."""
        with open(f"/proc/{self.cpu_pid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def fetch(url, ca=None, method="GET", headers=None):
    context = ssl.create_default_context(cafile=ca) if ca else None
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_until_up(url, ca=None, what="server", server=None):
    deadline = time.time() + 60
    while time.time() < deadline:
        if server and server.proc.poll() is not None:
            sys.exit(f"{what} exited early; see {server.log_path}")
        try:
            fetch(url, ca)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    sys.exit(f"{what} did not come up at {url}")


def to_ms(value):
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def children_cpu_seconds():
    """CPU time of the finished child processes so far (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stolen_seconds():
    """Per benchmark core, the time the host ran something else on it (steal, /proc/stat)."""
    cores = {f"cpu{SERVER_CPU}", f"cpu{LOAD_CPU}"}
    tick = os.sysconf("SC_CLK_TCK")
    stolen = {}
    with open("/proc/stat") as stat:
        for line in stat:
            fields = line.split()
            if fields and fields[0] in cores:
                stolen[fields[0]] = int(fields[8]) / tick if len(fields) > 8 else 0.0
    return stolen


class StealWatch:
    """Started before a run: `share()` after it is the largest share of either benchmark core
    the host took meanwhile."""

    def __init__(self):
        self.before, self.started = stolen_seconds(), time.monotonic()

    def share(self):
        after, wall = stolen_seconds(), time.monotonic() - self.started
        stolen = max((after[core] - self.before.get(core, 0.0) for core in after), default=0.0)
        return round(stolen / max(wall, 1e-9), 3)


def halts():
    """Per benchmark core, how many times it has gone idle in a state that halts the CPU (the
    cpuidle states other than polling, /sys/devices/system/cpu/cpuN/cpuidle); None where the
    kernel has no cpuidle driver."""
    counts = {}
    for role, core in (("servers", SERVER_CPU), ("load", LOAD_CPU)):
        root = f"/sys/devices/system/cpu/cpu{core}/cpuidle"
        try:
            states = sorted(os.listdir(root))
            total = 0
            for state in states:
                with open(os.path.join(root, state, "name")) as f:
                    if f.read().strip() == "POLL":
                        continue
                with open(os.path.join(root, state, "usage")) as f:
                    total += int(f.read())
        except OSError:
            return None
        counts[role] = total
    return counts


def halts_since(before):
    """The halts per core since `before` (from `halts()`), or None."""
    after = halts()
    if before is None or after is None:
        return None
    return {role: after[role] - before[role] for role in after}


def idle_policy():
    """How this machine idles its CPUs: the cpuidle driver and, with the haltpoll driver of a
    virtual machine, how long an idle CPU polls before it halts."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None
    policy = {"driver": read("/sys/devices/system/cpu/cpuidle/current_driver")}
    poll_ns = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    if poll_ns is not None:
        policy["guest_halt_poll_ns"] = int(poll_ns)
    return policy


def wrk(url, server, close=False):
    """One wrk run from the load CPU: requests/s, p50 and p99 in ms, how busy the server was
    and how busy wrk was (1.0 = one core saturated), the server's CPU per request (and the
    kernel's part), and the share of a benchmark core the host took meanwhile. With `close`,
    every request asks for `Connection: close`, so each opens a connection of its own."""
    steal = StealWatch()
    (user_before, kernel_before), wall_before = server.cpu_split(), time.monotonic()
    loadgen_before = children_cpu_seconds()
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}",
                          f"-d{CLOSE_DURATION if close else DURATION}", "--latency", *extra,
                          url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"wrk saw errors against {url}:\n{out}")
    wall = time.monotonic() - wall_before
    user, kernel = server.cpu_split()
    cpu = user - user_before + kernel - kernel_before
    percentile = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)$", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {
        "rps": rps,
        "p50_ms": to_ms(percentile["50"]),
        "p99_ms": to_ms(percentile["99"]),
        "server_cpu": round(cpu / wall, 2),
        "server_us_per_request": round(cpu / (rps * wall) * 1e6, 2),
        "server_kernel_us_per_request": round((kernel - kernel_before) / (rps * wall) * 1e6, 2),
        "loadgen_cpu": round((children_cpu_seconds() - loadgen_before) / wall, 2),
        "stolen": steal.share(),
    }


def equal_load(url, server, rate, ca=None):
    """One open-loop run at `rate` requests/s: the probe's latencies, how busy it was, and the
    server's CPU time per request (from /proc/PID/stat)."""
    user_before, kernel_before = server.cpu_split()
    extra = ["--ca", ca] if ca else []
    steal = StealWatch()
    out = probe(*extra, "rate", url, str(rate), str(EQ_SECONDS), "--connections",
                str(CONNECTIONS))
    out["stolen"] = steal.share()
    if out["statuses"] != {"200": out["n"]}:
        sys.exit(f"errors at {rate} requests/s against {url}: {out['statuses']}")
    user, kernel = server.cpu_split()
    out["server_us_per_request"] = round(
        (user - user_before + kernel - kernel_before) / out["n"] * 1e6, 2)
    out["server_kernel_us_per_request"] = round((kernel - kernel_before) / out["n"] * 1e6, 2)
    return out


def probe(*args, cpu=LOAD_CPU):
    done = subprocess.run(["taskset", "-c", cpu, PROBE, *args], capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"probe {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def rotated(items, round_):
    """`items` starting at the one whose turn it is this round: drift falls on all of them."""
    return items[round_ % len(items):] + items[:round_ % len(items)]


def median(runs, key):
    return statistics.median(run[key] for run in runs)


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml"],
                           capture_output=True, text=True).stdout.strip()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (modified)" if dirty else ""),
        "build": BUILD,
        "nginx": nginx.replace("nginx version: ", ""),
        "rounds": ROUNDS,
        "eq_rounds": EQ_ROUNDS,
        "eq_seconds": EQ_SECONDS,
        "poll_seconds": POLL_SECONDS,
        "outage_seconds": OUTAGE_SECONDS,
        "duration": DURATION,
        "connections": CONNECTIONS,
        "idle": idle_policy(),
    }


def make_front_certificate(work):
    """A self-signed P-256 certificate for 127.0.0.1/localhost, for both proxies' TLS listeners."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    # An end-entity certificate, trusted as itself: the probe verifies it.
                    "-addext", "basicConstraints=critical,CA:FALSE",
                    "-keyout", os.path.join(work, "front.key"),
                    "-out", os.path.join(work, "front.crt")],
                   check=True, capture_output=True)


# The gateway's [cache] lines in the hit, miss and storm scenarios: nginx's proxy_cache_valid.
DEFAULT_CACHE = f'ttl = "{TTL}"\nnegative_ttl = "{NEGATIVE_TTL}"'


def start_box(work, port, secret_file, servers, synthetic_agents=100_000, binary=None, env=None):
    """The simulated box on the load CPU, over TLS with a CA of its own; its URL and CA file.
    Appended to `servers`, so that whoever started it stops it."""
    sim_ca = os.path.join(work, "sim-ca.pem")
    sim = Server("simulator", [binary or BIN, "simulate", "--listen", f"127.0.0.1:{port}",
                               "--ca-out", sim_ca, "--secret-file", secret_file,
                               "--synthetic-agents", str(synthetic_agents)], work, cpu=LOAD_CPU,
                 env=env)
    servers.append(sim)
    sim_url = f"https://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not os.path.exists(sim_ca) and time.time() < deadline:
        time.sleep(0.05)
    wait_until_up(f"{sim_url}/_simulator/stats", sim_ca, "simulator", sim)
    return sim_url, sim_ca


def write_gateway_config(work, name, ports, box, cache=DEFAULT_CACHE, max_bytes="2GiB",
                         tls_lines=""):
    """A gateway's configuration in `work`: plain, TLS and admin listeners on `ports` (in that
    order), the front certificate of make_front_certificate (`tls_lines` added to [server.tls]),
    and the one account in front of `box` (its URL, CA file and secret file). Returns its
    path."""
    (plain, tls, admin), (sim_url, sim_ca, secret_file) = ports, box
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f"""
[server]
listen = "127.0.0.1:{tls}"
plain_listen = "127.0.0.1:{plain}"
[server.tls]
cert = "{work}/front.crt"
key = "{work}/front.key"
{tls_lines}
[admin]
listen = "127.0.0.1:{admin}"
token = "{ADMIN_TOKEN}"
[cache]
{cache}
max_bytes = "{max_bytes}"
[accounts.{ACCOUNT}]
base_url = "{sim_url}"
shared_secret_file = "{secret_file}"
ca_file = "{sim_ca}"
""")
    return path


def render_nginx_conf(work, ports):
    """Fill in bench/nginx.conf for `work` and make the directories nginx writes to."""
    # Started as root, nginx's workers run as an unprivileged user: let them into the
    # (throw-away) work directory for the static file, the cache and the temp files.
    os.chmod(work, 0o755)
    for sub in ["static", "static/static", "tmp", "cache", "tmp/body", "tmp/proxy",
                "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"]:
        os.makedirs(os.path.join(work, sub), exist_ok=True)
        os.chmod(os.path.join(work, sub), 0o777)
    with open(os.path.join(BENCH, "nginx.conf")) as f:
        conf = f.read()
    for key, value in {"WORK": work, "SIM_PORT": ports["sim"], "NGINX_PLAIN": ports["nginx_plain"],
                       "NGINX_TLS": ports["nginx_tls"], "STATIC_PORT": ports["static"],
                       "SECRET": SECRET, "TTL": TTL, "NEGATIVE_TTL": NEGATIVE_TTL}.items():
        conf = conf.replace(f"@{key}@", str(value))
    conf = conf.replace(f"root {work};", f"root {work}/static;")
    path = os.path.join(work, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def check():
    """For CI: every figure in the documents comes from the results files: each block written
    from them (the tables, the reading and the history in bench/README.md, the README's summary,
    results/latest.md, the fleet's and the replay's rows) is the one those files give now; and
    the nginx configuration renders and passes `nginx -t`."""
    import fleet  # noqa: E402  (imports this module; only the check needs it)
    import replay  # noqa: E402
    with open(os.path.join(RESULTS, "latest.json")) as f:
        r = json.load(f)["raw"]
    s = summarize(r)
    table = markdown(r, s)
    expected = [(path, f"<!-- {name}:start -->\n{text}\n<!-- {name}:end -->", name)
                for path, name, text in blocks(r, s, table)]
    for name, module in (("fleet", fleet), ("replay", replay)):
        with open(os.path.join(RESULTS, f"{name}.json")) as f:
            text = module.block(json.load(f))
        expected.append((os.path.join(BENCH, "README.md"),
                         f"<!-- {name}:start -->\n{text}<!-- {name}:end -->", name))
    expected.append((os.path.join(RESULTS, "latest.md"), latest_md(table), "latest.md"))
    stale = []
    for path, text, name in expected:
        with open(path) as f:
            if text not in f.read():
                stale.append(f"{os.path.relpath(path, ROOT)} ({name})")
    if stale:
        sys.exit("written by hand or from other results: " + ", ".join(stale) + "; write them "
                 "again from results/ with python3 bench/bench.py --rewrite (fleet.py and "
                 "replay.py --rewrite for their blocks)")
    print(f"bench/README.md, README.md, results/latest.md: {len(expected)} blocks as results/ "
          f"gives them")
    work = tempfile.mkdtemp(prefix="miralix-bench-check-")
    try:
        make_front_certificate(work)
        shutil.copy(os.path.join(work, "front.crt"), os.path.join(work, "sim-ca.pem"))
        ports = {name: free_port() for name in ["sim", "nginx_plain", "nginx_tls", "static"]}
        conf = render_nginx_conf(work, ports)
        subprocess.run(["nginx", "-t", "-q", "-p", work, "-c", conf], check=True)
        print("bench/nginx.conf: nginx -t ok")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    if sys.argv[1:] == ["--check"]:
        return check()
    if sys.argv[1:2] == ["--history-run"]:
        if len(sys.argv) != 3 or not sys.argv[2].strip():
            sys.exit("usage: bench.py --history-run LABEL (what changed before the run in "
                     "bench/results/latest.json, e.g. 'profile-guided build, halts counted')")
        return add_whole_run(sys.argv[2].strip())
    if sys.argv[1:] == ["--rewrite"]:
        # The tables, chart and prose again from bench/results/latest.json, without a run.
        with open(os.path.join(RESULTS, "latest.json")) as f:
            return write_results(json.load(f)["raw"])
    work = tempfile.mkdtemp(prefix="miralix-bench-")
    servers = []
    try:
        results = run(work, servers)
    finally:
        for server in reversed(servers):
            server.stop()
    write_results(results)
    shutil.rmtree(work, ignore_errors=True)


def run(work, servers):
    ports = {name: free_port() for name in
             ["sim", "gw_plain", "gw_tls", "gw_admin", "nginx_plain", "nginx_tls", "static",
              "mem_plain", "mem_tls", "mem_admin", "out_plain", "out_tls", "out_admin",
             "poll_plain", "poll_tls", "poll_admin"]}
    secret_file = os.path.join(work, "secret")
    with open(secret_file, "w") as f:
        f.write(SECRET)
    make_front_certificate(work)

    log("starting the simulated box")
    sim_url, sim_ca = start_box(work, ports["sim"], secret_file, servers)
    status, _, body = fetch(sim_url + HIT_PATH, sim_ca, headers={"X-Miralix-Shared-Secret": SECRET})
    assert status == 200, status
    os.makedirs(os.path.join(work, "static", "static"), exist_ok=True)
    with open(os.path.join(work, "static", "static", "list.json"), "wb") as f:
        f.write(body)
    log(f"hit body: {len(body)} bytes, {body.count(b'QueueCallId')} recordings")

    log("starting nginx")
    nginx_conf = render_nginx_conf(work, ports)
    subprocess.run(["nginx", "-t", "-q", "-p", work, "-c", nginx_conf], check=True)
    nginx = Server("nginx", ["nginx", "-p", work, "-c", nginx_conf], work)
    servers.append(nginx)

    def gateway_config(name, plain, tls, admin, cache=DEFAULT_CACHE, max_bytes="2GiB"):
        return write_gateway_config(work, name, (plain, tls, admin), (sim_url, sim_ca, secret_file),
                                    cache, max_bytes)

    env = dict(os.environ, RUST_LOG="warn")
    log("starting the gateway")
    gateway = Server("gateway", [BIN, "serve", "--config",
                                 gateway_config("gateway", ports["gw_plain"], ports["gw_tls"],
                                                ports["gw_admin"])], work, env=env)
    servers.append(gateway)
    wait_until_up(f"http://127.0.0.1:{ports['gw_admin']}/readyz", what="gateway", server=gateway)
    wait_until_up(f"http://127.0.0.1:{ports['static']}/static/list.json", what="nginx", server=nginx)

    urls = {
        "gateway": f"http://127.0.0.1:{ports['gw_plain']}{HIT_PATH}",
        "nginx": f"http://127.0.0.1:{ports['nginx_plain']}{HIT_PATH}",
        "static": f"http://127.0.0.1:{ports['static']}/static/list.json",
        "gateway_tls": f"https://127.0.0.1:{ports['gw_tls']}{HIT_PATH}",
        "nginx_tls": f"https://127.0.0.1:{ports['nginx_tls']}{HIT_PATH}",
    }
    front_ca = os.path.join(work, "front.crt")
    for name, url in urls.items():
        for _ in range(2):  # the first request fills each cache
            status, headers, got = fetch(url, front_ca)
        assert status == 200 and got == body, f"{name}: {status}, {len(got)} bytes"
    log("all five endpoints serve the identical body")

    results = {"machine": machine(), "body_bytes": len(body)}

    log(f"hit throughput, plain HTTP: {ROUNDS} rounds x gateway/nginx/static x {DURATION}")
    owner = {"gateway": gateway, "nginx": nginx, "static": nginx}
    hit = {"gateway": [], "nginx": [], "static": []}
    for round_ in range(ROUNDS):
        for name in hit:
            hit[name].append(wrk(urls[name], owner[name]))
            log(f"  round {round_ + 1} {name}: {hit[name][-1]}")
    results["hit_plain"] = hit

    log(f"hit throughput, TLS: {ROUNDS} rounds x gateway/nginx x {DURATION}")
    hit_tls = {"gateway": [], "nginx": []}
    for round_ in range(ROUNDS):
        for name in hit_tls:
            hit_tls[name].append(wrk(urls[f"{name}_tls"], owner[name]))
            log(f"  round {round_ + 1} {name}: {hit_tls[name][-1]}")
    results["hit_tls"] = hit_tls

    log(f"new connection per request: {ROUNDS} rounds x gateway/nginx x {CLOSE_DURATION}, plain "
        f"and TLS, wrk with Connection: close")
    fresh = {}
    for mode, suffix in [("plain", ""), ("tls", "_tls")]:
        fresh[mode] = {"gateway": [], "nginx": []}
        for round_ in range(ROUNDS):
            for name in rotated(list(fresh[mode]), round_):
                fresh[mode][name].append(wrk(urls[name + suffix], owner[name], close=True))
                log(f"  {mode} round {round_ + 1} {name}: {fresh[mode][name][-1]}")
    results["new_connections"] = fresh

    results["equal_load"] = {}
    for mode, saturated, suffix in [("plain", hit, ""), ("tls", hit_tls, "_tls")]:
        slowest = min(median(runs, "rps") for runs in saturated.values())
        rates = [int(round(slowest * share, -2)) for share in EQ_SHARES]
        names = list(saturated)
        log(f"equal load, {mode}: {rates} requests/s (of the slowest saturated, {slowest:,.0f}), "
            f"{EQ_ROUNDS} rounds x {names} x {EQ_SECONDS:g} s, open loop, {CONNECTIONS} "
            f"connections")
        runs = {str(rate): {name: [] for name in names} for rate in rates}
        for rate in rates:
            for round_ in range(EQ_ROUNDS):
                # Each round starts with the next server, so drift falls on all of them.
                for name in rotated(names, round_):
                    url = urls[name + suffix] if name != "static" else urls["static"]
                    outcome = equal_load(url, owner[name], rate,
                                         front_ca if mode == "tls" else None)
                    runs[str(rate)][name].append(outcome)
                    log(f"  {rate}/s round {round_ + 1} {name}: "
                        f"{outcome['server_us_per_request']} us/request, "
                        f"p99 {outcome['p99_ms']} ms, probe cpu {outcome['probe_cpu']}")
        results["equal_load"][mode] = {"slowest_saturated_rps": slowest, "rates": rates,
                                       "runs": runs}

    def upstream_requests():
        return json.loads(fetch(f"{sim_url}/_simulator/stats", sim_ca)[2])["requests"]

    log(f"cold-miss storm: {STORM} concurrent requests, upstream delay {STORM_DELAY_MS} ms")
    fetch(f"{sim_url}/_simulator/delay?ms={STORM_DELAY_MS}", sim_ca, method="PUT")
    storm = {"gateway": [], "nginx": []}
    next_id = FIRST_SYNTHETIC
    for round_ in range(ROUNDS):
        for name in storm:
            base = urls[name].split("/mot/")[0]
            before = upstream_requests()
            outcome = probe("storm", base + ID_TEMPLATE.replace("{n}", str(next_id)), str(STORM))
            outcome["upstream_requests"] = upstream_requests() - before
            next_id += 1
            storm[name].append(outcome)
            log(f"  round {round_ + 1} {name}: {outcome}")
    results["storm"] = storm
    fetch(f"{sim_url}/_simulator/delay?ms=0", sim_ca, method="PUT")

    log(f"miss overhead: {ROUNDS} rotating rounds of {MISSES} sequential misses on distinct "
        f"agents, each a 200 list")
    direct = ["--ca", sim_ca, "--header", f"X-Miralix-Shared-Secret: {SECRET}"]
    # "direct" runs where the other clients run, on the box's core; "direct_cross" from the
    # servers' core, the way the proxies' own requests to the box travel.
    sources = [("direct", sim_url, direct, LOAD_CPU), ("direct_cross", sim_url, direct, SERVER_CPU),
               ("gateway", urls["gateway"].split("/mot/")[0], [], LOAD_CPU),
               ("nginx", urls["nginx"].split("/mot/")[0], [], LOAD_CPU)]
    misses = {name: [] for name, *_ in sources}
    hit_rounds = {"gateway": [], "nginx": []}
    for round_ in range(ROUNDS):
        for name, base, extra, cpu in rotated(sources, round_):
            server = owner.get(name) if name in ("gateway", "nginx") else None
            used = server.cpu_split() if server else None
            steal, halted = StealWatch(), halts()
            outcome = probe(*extra, "sequence", base, ID_TEMPLATE, str(next_id), str(MISSES),
                            cpu=cpu)
            outcome["stolen"] = steal.share()
            outcome["halts"] = halts_since(halted)
            if server:  # user and kernel CPU seconds of the misses (the gateway's whole process)
                outcome["server_cpu_s"] = [b - a for a, b in zip(used, server.cpu_split())]
            # Every miss must be a list the box had to build (not a 404 for an unknown agent).
            if outcome["statuses"] != {"200": MISSES}:
                sys.exit(f"misses against {base} were not all 200s: {outcome['statuses']}")
            misses[name].append(outcome)
            log(f"  round {round_ + 1} {name}: {outcome}")
            if name in ("gateway", "nginx"):
                # The same keys again, now hits: what the client's own hop to this proxy and
                # back costs, the part of a miss that no proxy on another core can avoid.
                halted = halts()
                hits = probe("sequence", base, ID_TEMPLATE, str(next_id), str(MISSES), cpu=cpu)
                hits["halts"] = halts_since(halted)
                if hits["statuses"] != {"200": MISSES}:
                    sys.exit(f"hits against {base} were not all 200s: {hits['statuses']}")
                hit_rounds[name].append(hits)
                log(f"  round {round_ + 1} {name}, the same keys as hits: {hits}")
            next_id += MISSES
    results["miss"] = misses
    results["miss_hits"] = hit_rounds

    log(f"upstream outage: the box drops every request for {OUTAGE_SECONDS} s; a client keeps "
        f"reading {OUTAGE_KEYS} cached keys (ttl 2s, stale_while_revalidate 2s, stale_if_error 10m)")
    outage_gw = Server("gateway-outage", [BIN, "serve", "--config", gateway_config(
        "outage", ports["out_plain"], ports["out_tls"], ports["out_admin"],
        cache='ttl = "2s"\nstale_while_revalidate = "2s"\nstale_if_error = "10m"')],
        work, env=env)
    servers.append(outage_gw)
    wait_until_up(f"http://127.0.0.1:{ports['out_admin']}/readyz", what="gateway", server=outage_gw)
    outage_base = f"http://127.0.0.1:{ports['out_plain']}"
    next_id += 10_000
    warm = probe("sequence", outage_base, ID_TEMPLATE, str(next_id), str(OUTAGE_KEYS))
    assert warm["statuses"] == {"200": OUTAGE_KEYS}, warm
    fetch(f"{sim_url}/_simulator/failure?mode=close", sim_ca, method="PUT")
    try:
        soak = probe("soak", outage_base, ID_TEMPLATE, str(next_id), str(OUTAGE_KEYS),
                     str(OUTAGE_SECONDS))
    finally:
        fetch(f"{sim_url}/_simulator/failure?mode=none", sim_ca, method="PUT")
    metrics = fetch(f"http://127.0.0.1:{ports['out_admin']}/metrics")[2].decode()
    stale = sum(float(v) for v in re.findall(
        r'^miralix_gateway_cache_stale_served_total\{[^}]*\} (\S+)', metrics, re.M))
    soak["stale_served"] = int(stale)
    soak["failed"] = soak["n"] - soak["statuses"].get("200", 0)
    results["outage"] = soak
    log(f"  {soak}")
    outage_gw.stop()
    servers.remove(outage_gw)

    log(f"poller: {POLL_AGENTS * POLLERS_PER_AGENT} clients polling {POLL_AGENTS} agents every 1 s "
        f"with a rising fromQueueCallId, a new call every {NEW_CALL_EVERY_S} s, ttl "
        f"{POLL_TTL_S}s, {POLL_SECONDS} s per run: delta refresh on, then off")
    results["poller"] = {}
    for mode, interval in [("delta", "15m"), ("full", "0s")]:
        next_id += 10_000
        poll_gw = Server(f"gateway-poller-{mode}", [BIN, "serve", "--config", gateway_config(
            f"poller-{mode}", ports["poll_plain"], ports["poll_tls"], ports["poll_admin"],
            cache=f'ttl = "{POLL_TTL_S}s"\nfull_refresh_interval = "{interval}"')],
            work, env=env)
        servers.append(poll_gw)
        wait_until_up(f"http://127.0.0.1:{ports['poll_admin']}/readyz", what="gateway",
                      server=poll_gw)
        outcome = poller(f"http://127.0.0.1:{ports['poll_plain']}",
                         f"http://127.0.0.1:{ports['poll_admin']}", sim_url, sim_ca, next_id)
        results["poller"][mode] = outcome
        log(f"  {mode}: {outcome}")
        poll_gw.stop()
        servers.remove(poll_gw)

    log(f"memory: a fresh gateway with max_bytes {MEMORY_MAX_BYTES_MIB} MiB takes "
        f"{FILL_UNKNOWN} distinct 404s, then {FILL_AGENTS} distinct lists, from a box that "
        f"writes each answer in small pieces")
    gateway.stop()
    servers.remove(gateway)
    fresh = Server("gateway-memory", [BIN, "serve", "--config",
                                      gateway_config("memory", ports["mem_plain"], ports["mem_tls"],
                                                     ports["mem_admin"],
                                                     cache=f'ttl = "{TTL}"\nnegative_ttl = "{TTL}"',
                                                     max_bytes=f"{MEMORY_MAX_BYTES_MIB}MiB")],
                   work, env=env)
    servers.append(fresh)
    wait_until_up(f"http://127.0.0.1:{ports['mem_admin']}/readyz", what="gateway", server=fresh)
    # Head and body in separate small writes, as many real boxes send them.
    fetch(f"{sim_url}/_simulator/writes?mode=split", sim_ca, method="PUT")
    rss_before = fresh.rss_bytes()
    unknown = probe("sequence", f"http://127.0.0.1:{ports['mem_plain']}", ID_TEMPLATE,
                    str(FIRST_SYNTHETIC * 50), str(FILL_UNKNOWN), "--parallel", "8")
    rss_after_404s = fresh.rss_bytes()
    next_id += 10_000
    fill = probe("sequence", f"http://127.0.0.1:{ports['mem_plain']}", ID_TEMPLATE, str(next_id),
                 str(FILL_AGENTS), "--parallel", "8")
    fetch(f"{sim_url}/_simulator/writes?mode=whole", sim_ca, method="PUT")
    metrics = fetch(f"http://127.0.0.1:{ports['mem_admin']}/metrics")[2].decode()
    cached = int(float(re.search(r"^miralix_gateway_cache_bytes (\S+)", metrics, re.M).group(1)))
    entries = int(float(re.search(r"^miralix_gateway_cache_entries (\S+)", metrics, re.M).group(1)))
    results["memory"] = {"rss_before": rss_before, "rss_after_404s": rss_after_404s,
                         "rss_after": fresh.rss_bytes(), "max_bytes": MEMORY_MAX_BYTES_MIB << 20,
                         "cached_bytes": cached, "entries": entries, "unknown": unknown,
                         "fill": fill}
    log(f"  {results['memory']}")
    return results


def poller(base, admin, sim_url, sim_ca, first_agent):
    """Clients polling with a rising fromQueueCallId while the box records new calls; what the
    box had to send, per minute, and whether every client saw every new call."""
    agents = [first_agent + n for n in range(POLL_AGENTS)]

    def ids(agent, after):
        target = f"{base}{ID_TEMPLATE.replace('{n}', str(agent))}?fromQueueCallId={after}"
        status, _, body = fetch(target)
        assert status == 200, (status, body[:200])
        return [r["QueueCallId"] for r in json.loads(body)]

    def stats():
        return json.loads(fetch(f"{sim_url}/_simulator/stats", sim_ca)[2])

    # Each agent's history is read once (the first poll of a client that starts from zero).
    last = {agent: max(ids(agent, 0)) for agent in agents}
    start_ids = dict(last)
    before = stats()
    deadline = time.time() + POLL_SECONDS
    seen = [[] for _ in range(POLL_AGENTS * POLLERS_PER_AGENT)]
    polls = [0] * len(seen)

    def client(index):
        agent = agents[index // POLLERS_PER_AGENT]
        after = start_ids[agent]
        while time.time() < deadline:
            began = time.time()
            new = ids(agent, after)
            polls[index] += 1
            seen[index] += new
            after = max([after] + new)
            time.sleep(max(0.0, 1.0 - (time.time() - began)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(seen))]
    for t in threads:
        t.start()
    added = {agent: [] for agent in agents}
    turn = 0
    while time.time() < deadline:
        agent = agents[turn % POLL_AGENTS]
        turn += 1
        status, _, body = fetch(f"{sim_url}/_simulator/calls?account={ACCOUNT}&agent={agent}",
                                sim_ca, method="POST")
        assert status == 200, (status, body)
        added[agent] += json.loads(body)["added"]
        time.sleep(NEW_CALL_EVERY_S)
    for t in threads:
        t.join()
    after = stats()
    minutes = POLL_SECONDS / 60
    # Catch-up: refresh every agent now, and each client polls once more.
    for agent in agents:
        status, _, _ = fetch(f"{admin}/cache/{ACCOUNT}/agents/id/{agent}/refresh", method="POST",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 200, status
    missed = 0
    for index in range(len(seen)):
        agent = agents[index // POLLERS_PER_AGENT]
        done = seen[index] + ids(agent, max([start_ids[agent]] + seen[index]))
        missed += len(set(added[agent]) - set(done))
    return {
        "upstream_calls_per_min": round((after["requests"] - before["requests"]) / minutes, 1),
        "upstream_bytes_per_min": round((after["list_bytes"] - before["list_bytes"]) / minutes),
        "client_polls_per_min": round(sum(polls) / minutes),
        "new_calls": sum(len(v) for v in added.values()),
        "missed_by_clients": missed,
    }


GOAL_SATURATED, GOAL_STATIC, GOAL_CPU, GOAL_MISS_MS = 1.5, 0.95, 1.25, 0.1
# The names of the goals that the history's row of whole runs also counts (`RUN_GOALS`).
STATIC_GOAL = f"hit throughput >= {GOAL_STATIC}x static file (median)"


def cpu_goal(label):
    return (f"equal load, {label}: nginx's CPU per request >= {GOAL_CPU}x the gateway's at "
            f"every rate (medians)")


def p99_goal(label):
    return f"equal load, {label}: gateway p99 <= nginx's at every rate (medians)"


def spread_of(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def miss_floor_sentence(s):
    """What a proxy that cost nothing would add to a miss in this layout, and the rest."""
    if "miss_floor_ms" not in s:
        return ""
    hit, floor, own = s["miss_hit_p50_ms"], s["miss_floor_ms"], s["miss_own_ms"]
    margin = GOAL_MISS_MS - floor["gateway"]["median"]
    verdict = (f"at the median, that floor alone is {-margin:.3f} ms above the {GOAL_MISS_MS} ms "
               f"goal" if margin < 0 else
               f"at the median, the {GOAL_MISS_MS} ms goal leaves a proxy {margin:.3f} ms above "
               f"that floor")
    return (
        f"That hop, measured as hits on the same keys right after each round's misses, took "
        f"{hit['gateway']['median']:.3f} ms through the gateway and "
        f"{hit['nginx']['median']:.3f} ms through nginx. Together, per round, the hop and the "
        f"crossing put the floor of a proxy's miss overhead here at "
        f"{floor['gateway']['median']:.3f} ms for the gateway (rounds "
        f"{floor['gateway']['min']:.3f} to {floor['gateway']['max']:.3f}) and "
        f"{floor['nginx']['median']:.3f} ms for nginx: {verdict}. Above its floor, the gateway's own work "
        f"on a miss (the request to the box through its client, the check of the answer, the "
        f"ETag, storing it) added {own['gateway']['median']:.3f} ms (rounds "
        f"{own['gateway']['min']:.3f} to {own['gateway']['max']:.3f}); nginx's "
        f"{own['nginx']['median']:.3f} ms ({own['nginx']['min']:.3f} to "
        f"{own['nginx']['max']:.3f}). ")


def halts_per_request(r):
    """Per kind of sequential request in the miss scenario (direct, direct_cross, each proxy's
    misses, and its hits on the same keys as "gateway_hits", "nginx_hits"): the halts per
    request of each benchmark core, medians of the rounds; None for a run without the counts."""
    kinds = dict(r["miss"])
    kinds.update({f"{name}_hits": runs for name, runs in r.get("miss_hits", {}).items()})
    halted = {}
    for kind, runs in kinds.items():
        if not runs or any(run.get("halts") is None for run in runs):
            return None
        halted[kind] = {role: round(statistics.median(
            run["halts"][role] / sum(run["statuses"].values()) for run in runs), 2)
            for role in ("servers", "load")}
    return halted


def new_connections(r):
    """Per protocol and server, the runs with a new connection for each request: requests/s,
    CPU per request and its kernel part (median and range), and how many rounds wrk's own core
    was at least LOADGEN_BUSY busy; None for a run without them."""
    if "new_connections" not in r:
        return None
    return {mode: {name: {"rps": spread_of([x["rps"] for x in runs]),
                          "us": spread_of([x["server_us_per_request"] for x in runs]),
                          "kernel_us": spread_of([x["server_kernel_us_per_request"]
                                                  for x in runs]),
                          "loadgen_busy": sum(1 for x in runs
                                              if x.get("loadgen_cpu", 0) >= LOADGEN_BUSY)}
                   for name, runs in per.items()}
            for mode, per in r["new_connections"].items()}


def new_connections_sentence(s):
    """The runs with a new connection for each request, in words: who served more and at what
    CPU, and where the difference lies."""
    if "new_connections" not in s:
        return ""
    parts = []
    for mode, label in (("plain", "On plain HTTP,"), ("tls", "With TLS (a full handshake each),")):
        g, n = s["new_connections"][mode]["gateway"], s["new_connections"][mode]["nginx"]
        gu = g["us"]["median"] - g["kernel_us"]["median"]
        nu = n["us"]["median"] - n["kernel_us"]["median"]
        text = (f"{label} the gateway served {g['rps']['median']:,.0f} requests/s (rounds "
                f"{g['rps']['min']:,.0f} to {g['rps']['max']:,.0f}) against nginx's "
                f"{n['rps']['median']:,.0f}, at {g['us']['median']:.1f} us of CPU per request "
                f"against {n['us']['median']:.1f}: "
                + cpu_compared(g["us"]["median"], n["us"]["median"], "per request")
                + f" ({gu:.1f} against {nu:.1f} us in user space, "
                f"{g['kernel_us']['median']:.1f} against {n['kernel_us']['median']:.1f} in the "
                f"kernel)")
        if g["us"]["median"] > n["us"]["median"] and gu > nu:
            text += (". Here the gateway costs more than nginx, in user space: setting up and "
                     "tearing down a connection (hyper's connection state and buffers, tokio's "
                     "task and its registration) costs it more than nginx")
        parts.append(text + ".")
    busy = {mode: sum(x["loadgen_busy"] for x in per.values())
            for mode, per in s["new_connections"].items()}
    text = ("**A new connection for each request** (wrk with `Connection: close`: what a client "
            "that opens a connection for each request costs). " + " ".join(parts))
    if busy["plain"] + busy["tls"]:
        text += (f" wrk's own core was at least {LOADGEN_BUSY} busy in {busy['plain']} of the "
                 f"plain and {busy['tls']} of the TLS runs: in those the rate is the load "
                 f"generator's, and the CPU per request is what compares the servers.")
    return text


def miss_cpu(miss):
    """Per proxy, its CPU per miss in microseconds over the miss rounds, all of it and the
    kernel's part (median and range); None for a run that did not read it."""
    cpu = {}
    for name in ("gateway", "nginx"):
        runs = miss.get(name, [])
        if not runs or any("server_cpu_s" not in run for run in runs):
            return None
        per = [(sum(run["server_cpu_s"]) / sum(run["statuses"].values()) * 1e6,
                run["server_cpu_s"][1] / sum(run["statuses"].values()) * 1e6) for run in runs]
        cpu[name] = {"all": spread_of([round(a) for a, _ in per]),
                     "kernel": spread_of([round(k) for _, k in per])}
    return cpu


def miss_cpu_sentence(s):
    """What a miss cost each proxy in CPU, and what the gateway's figure holds."""
    if "miss_cpu_us" not in s:
        return ""
    g, n = s["miss_cpu_us"]["gateway"], s["miss_cpu_us"]["nginx"]
    return (
        f"In CPU, read from /proc over each round of {MISSES} misses (in 10 ms ticks), a miss "
        f"cost the gateway's process {g['all']['median']:.0f} us at the median (rounds "
        f"{g['all']['min']:.0f} to {g['all']['max']:.0f}; {g['kernel']['median']:.0f} us of it in "
        f"the kernel) and nginx's worker {n['all']['median']:.0f} us ({n['all']['min']:.0f} to "
        f"{n['all']['max']:.0f}; {n['kernel']['median']:.0f} in the kernel): "
        + cpu_compared(g["all"]["median"], max(n["all"]["median"], 1), "per miss")
        + ". The gateway's figure includes the work it does once per fetched list so that its "
        "hits need none: the ETag's SHA-256, the JSON check, the gzip copy, and the parse into "
        "elements for selections and delta refresh. ")


def halts_sentence(s):
    """How often the cores halted per request in the miss scenario, and what a halt cost."""
    if "miss_halts" not in s:
        return ""
    h, mp, idle = s["miss_halts"], s["miss_p50_ms"], s["idle"]
    def both(kind):
        return h[kind]["servers"] + h[kind]["load"]
    policy = f"the {idle['driver']} cpuidle driver" if idle.get("driver") else "its idle policy"
    if idle.get("guest_halt_poll_ns") == 0:
        policy += ", set by haltpoll.guest_halt_poll_ns = 0 not to poll before it halts"
    elif "guest_halt_poll_ns" in idle:
        policy += (f", which polls for up to {idle['guest_halt_poll_ns']:,} ns before it halts "
                   f"by haltpoll.guest_halt_poll_ns")
    text = (
        f"On this machine ({policy}), a core with nothing to run halts, and what wakes it waits "
        f"for it to resume. Counted per request from cpuidle, both cores together: "
        f"{both('direct'):.1f} halts for a direct "
        f"request from the box's core, {both('direct_cross'):.1f} from the servers' core; "
        f"{both('gateway'):.1f} for a miss through the gateway ({both('gateway_hits'):.1f} for "
        f"a hit on the same keys) and {both('nginx'):.1f} through nginx "
        f"({both('nginx_hits'):.1f} for a hit). ")
    extra = both("direct_cross") - both("direct")
    if extra >= 0.5:
        slower = mp["direct_cross"]["median"] - mp["direct"]["median"]
        text += (f"So a crossing here finds the other core halted: the direct request from the "
                 f"servers' core halted {extra:.1f} times more and "
                 f"took {slower * 1000:.0f} us longer at the median: about "
                 f"{slower / extra * 1000:.0f} us a halt. ")
    return text


# What the saturated tables keep of each run, as the median of the rounds.
SATURATED_FIGURES = ("rps", "p50_ms", "p99_ms", "server_cpu", "server_us_per_request")


def summarize(r):
    hp, ht, storm, miss, mem = r["hit_plain"], r["hit_tls"], r["storm"], r["miss"], r["memory"]
    s = {
        "hit_plain": {n: {k: median(runs, k) for k in SATURATED_FIGURES} for n, runs in hp.items()},
        "hit_tls": {n: {k: median(runs, k) for k in SATURATED_FIGURES} for n, runs in ht.items()},
        "storm": {n: {"upstream_requests": max(x["upstream_requests"] for x in runs),
                      "p50_ms": median(runs, "p50_ms"), "p99_ms": median(runs, "p99_ms"),
                      "ok": min(x["statuses"].get("200", 0) for x in runs)}
                  for n, runs in storm.items()},
        "miss_p50_ms": {n: spread_of([x["p50_ms"] for x in runs]) for n, runs in miss.items()},
    }
    # Per round: a proxy's p50 less the direct request's p50 of the same round.
    s["miss_overhead_rounds"] = {
        n: [round(x["p50_ms"] - d["p50_ms"], 3) for x, d in zip(miss[n], miss["direct"])]
        for n in ("gateway", "nginx")}
    s["miss_overhead_ms"] = {n: round(statistics.median(v), 3)
                             for n, v in s["miss_overhead_rounds"].items()}
    if "miss_hits" in r:
        # Per round, the overhead a proxy that cost nothing would still show here: its client's
        # hop to it and back (a hit on the same keys) plus its own request to the box from the
        # servers' core, less the direct request. What a proxy adds beyond that is its own work.
        floor = {n: [h["p50_ms"] + c["p50_ms"] - d["p50_ms"] for h, c, d in
                     zip(r["miss_hits"][n], miss["direct_cross"], miss["direct"])]
                 for n in ("gateway", "nginx")}
        s["miss_hit_p50_ms"] = {n: spread_of([x["p50_ms"] for x in runs])
                                for n, runs in r["miss_hits"].items()}
        s["miss_floor_ms"] = {n: spread_of([round(x, 3) for x in v]) for n, v in floor.items()}
        s["miss_own_ms"] = {n: spread_of([round(o - f, 3) for o, f in
                                          zip(s["miss_overhead_rounds"][n], floor[n])])
                            for n in floor}
    fresh = new_connections(r)
    if fresh:
        s["new_connections"] = fresh
    cpu = miss_cpu(miss)
    if cpu:
        s["miss_cpu_us"] = cpu
    halted = halts_per_request(r)
    if halted:
        s["miss_halts"] = halted
        s["idle"] = r["machine"].get("idle", {})
    s["outage"] = r["outage"]
    s["poller"] = r["poller"]
    mib = 1024 * 1024
    s["memory"] = {"rss_mib": round(mem["rss_after"] / mib, 1),
                   "rss_404s_mib": round(mem["rss_after_404s"] / mib, 1),
                   "rss_idle_mib": round(mem["rss_before"] / mib, 1),
                   "max_bytes_mib": round(mem["max_bytes"] / mib, 1),
                   "cached_mib": round(mem["cached_bytes"] / mib, 1),
                   "entries": mem["entries"],
                   "limit_mib": round((1.5 * mem["max_bytes"] + 40 * mib) / mib, 1)}
    g, n, st = s["hit_plain"]["gateway"], s["hit_plain"]["nginx"], s["hit_plain"]["static"]
    gt, nt = s["hit_tls"]["gateway"], s["hit_tls"]["nginx"]
    sg = s["storm"]["gateway"]
    pd, pf = s["poller"]["delta"], s["poller"]["full"]
    # Goals are judged on these ratios as measured, the tables show them rounded.
    exact = {"hit_rps_plain": g["rps"] / n["rps"], "hit_rps_tls": gt["rps"] / nt["rps"],
             "hit_rps_vs_static": g["rps"] / st["rps"]}
    s["ratios"] = {
        **{key: round(value, 2) for key, value in exact.items()},
        "hit_p99_plain_nginx_over_gateway": round(n["p99_ms"] / g["p99_ms"], 2),
        "hit_p99_tls_nginx_over_gateway": round(nt["p99_ms"] / gt["p99_ms"], 2),
        "storm_p99_nginx_over_gateway": round(s["storm"]["nginx"]["p99_ms"] / sg["p99_ms"], 2),
    }
    # Per round, the ratio of the gateway's rate to nginx's (and the static file's), alternating.
    def round_ratios(runs, a, b):
        return [x["rps"] / y["rps"] for x, y in zip(runs[a], runs[b])]

    s["ratio_rounds"] = {
        "hit_rps_plain": round_ratios(hp, "gateway", "nginx"),
        "hit_rps_tls": round_ratios(ht, "gateway", "nginx"),
        "hit_rps_vs_static": round_ratios(hp, "gateway", "static"),
    }
    s["loadgen_busy_rounds"] = {
        mode: sum(1 for runs in saturated.values() for x in runs
                  if x.get("loadgen_cpu", 0) >= LOADGEN_BUSY)
        for mode, saturated in (("plain", hp), ("tls", ht))}
    s["loadgen_busy_by_server"] = {
        mode: {name: sum(1 for x in runs if x.get("loadgen_cpu", 0) >= LOADGEN_BUSY)
               for name, runs in saturated.items()}
        for mode, saturated in (("plain", hp), ("tls", ht))}
    # The most one wrk core could have driven at the CPU it spent per request in the gateway's
    # runs, as a multiple of nginx's median rate: above it, no server could show a higher ratio.
    s["loadgen_ceiling"] = {}
    for mode, saturated in (("plain", hp), ("tls", ht)):
        spent = [x["loadgen_cpu"] / x["rps"] * 1e6 for x in saturated["gateway"]
                 if x.get("loadgen_cpu")]
        if spent:
            us = statistics.median(spent)
            s["loadgen_ceiling"][mode] = {
                "wrk_us_per_request": us, "max_rps": 1e6 / us,
                "over_nginx": 1e6 / us / median(saturated["nginx"], "rps")}
    # Runs in which the host took a benchmark core's time: per kind, (contended, all, largest).
    def contended(runs):
        shares = [x["stolen"] for x in runs if "stolen" in x]
        return [sum(1 for v in shares if v >= STOLEN), len(shares), max(shares, default=0)]

    s["stolen"] = {
        "saturated": contended(x for kind in (hp, ht) for runs in kind.values() for x in runs),
        "equal": contended(x for eq in r.get("equal_load", {}).values()
                           for per in eq["runs"].values() for runs in per.values()
                           for x in runs),
        "miss": contended(x for runs in miss.values() for x in runs),
    }
    s["equal"] = {}
    for mode, eq in r.get("equal_load", {}).items():
        rows, ratios, round_ratios_at, p99_ok = {}, {}, {}, True
        for rate in eq["rates"]:
            per = eq["runs"][str(rate)]
            rows[rate] = {name: {
                "cpu": spread_of([x["server_us_per_request"] for x in runs]),
                "kernel": spread_of([x["server_kernel_us_per_request"] for x in runs]),
                "p50": spread_of([x["p50_ms"] for x in runs]),
                "p99": spread_of([x["p99_ms"] for x in runs]),
                "p999": spread_of([x["p999_ms"] for x in runs]),
                "achieved": statistics.median(x["achieved_rps"] for x in runs),
                "busy_rounds": sum(1 for x in runs if x["probe_cpu"] >= LOADGEN_BUSY),
                "stolen_rounds": sum(1 for x in runs if x.get("stolen", 0) >= STOLEN),
            } for name, runs in per.items()}
            gateway, nginx = rows[rate]["gateway"], rows[rate]["nginx"]
            ratios[rate] = nginx["cpu"]["median"] / gateway["cpu"]["median"]
            # The servers alternate within a round, so a round's two runs saw the same host.
            round_ratios_at[rate] = [n["server_us_per_request"] / g["server_us_per_request"]
                                     for g, n in zip(per["gateway"], per["nginx"])]
            p99_ok &= gateway["p99"]["median"] <= nginx["p99"]["median"]
        s["equal"][mode] = {"rates": eq["rates"], "slowest": eq["slowest_saturated_rps"],
                            "rows": rows, "cpu_ratio": ratios, "cpu_ratio_rounds": round_ratios_at,
                            "p99_ok": p99_ok}

    def ranged(key):
        rounds = s["ratio_rounds"][key]
        return f"{exact[key]:.3f}x (rounds {min(rounds):.2f} to {max(rounds):.2f})"

    s["goals"] = [
        (f"hit throughput >= {GOAL_SATURATED}x nginx (plain, saturated, median)",
         exact["hit_rps_plain"] >= GOAL_SATURATED, ranged("hit_rps_plain")),
        (f"hit throughput >= {GOAL_SATURATED}x nginx (TLS, saturated, median)",
         exact["hit_rps_tls"] >= GOAL_SATURATED, ranged("hit_rps_tls")),
        (STATIC_GOAL, exact["hit_rps_vs_static"] >= GOAL_STATIC, ranged("hit_rps_vs_static")),
    ]
    for mode, eq in s["equal"].items():
        label = "plain" if mode == "plain" else "TLS"
        cpu = ", ".join(f"{rate:,}/s {eq['cpu_ratio'][rate]:.2f}x" for rate in eq["rates"])
        s["goals"].append((cpu_goal(label),
                           all(v >= GOAL_CPU for v in eq["cpu_ratio"].values()), cpu))
        p99 = ", ".join(f"{rate:,}/s {eq['rows'][rate]['gateway']['p99']['median']:.2f} vs "
                        f"{eq['rows'][rate]['nginx']['p99']['median']:.2f} ms"
                        for rate in eq["rates"])
        s["goals"].append((p99_goal(label), eq["p99_ok"], p99))
    s["goals"] += [
        ("storm: exactly 1 upstream request", sg["upstream_requests"] == 1,
         f"{sg['upstream_requests']} (max over rounds)"),
        (f"storm: p99 <= {STORM_DELAY_MS + 50} ms", sg["p99_ms"] <= STORM_DELAY_MS + 50,
         f"{sg['p99_ms']:.1f} ms"),
        (f"miss overhead p50 <= {GOAL_MISS_MS} ms",
         s["miss_overhead_ms"]["gateway"] <= GOAL_MISS_MS,
         f"{s['miss_overhead_ms']['gateway']:.3f} ms (rounds "
         f"{min(s['miss_overhead_rounds']['gateway']):.3f} to "
         f"{max(s['miss_overhead_rounds']['gateway']):.3f}; nginx: "
         f"{s['miss_overhead_ms']['nginx']:.3f} ms"
         + (f"; floor of this layout {s['miss_floor_ms']['gateway']['median']:.3f} ms"
            if "miss_floor_ms" in s else "") + ")"),
        ("RSS <= 1.5x max_bytes + 40 MiB, after 404s and after lists",
         max(s["memory"]["rss_mib"], s["memory"]["rss_404s_mib"]) <= s["memory"]["limit_mib"],
         f"{s['memory']['rss_404s_mib']} / {s['memory']['rss_mib']} MiB vs limit "
         f"{s['memory']['limit_mib']} MiB"),
        (f"outage: no failed request for cached keys during {OUTAGE_SECONDS} s",
         s["outage"]["failed"] == 0,
         f"{s['outage']['failed']} failed of {s['outage']['n']}"),
        ("poller: delta refresh moves fewer upstream bytes than full refreshes",
         pd["upstream_bytes_per_min"] < pf["upstream_bytes_per_min"],
         f"{pd['upstream_bytes_per_min']:,} vs {pf['upstream_bytes_per_min']:,} bytes/min"),
        ("poller: every client saw every new call", pd["missed_by_clients"] == 0
         and pf["missed_by_clients"] == 0,
         f"{pd['missed_by_clients']} + {pf['missed_by_clients']} missed"),
    ]
    return s


def markdown(r, s):
    m = r["machine"]
    hp, ht, st, mo = s["hit_plain"], s["hit_tls"], s["storm"], s["miss_overhead_ms"]
    pd, pf = s["poller"]["delta"], s["poller"]["full"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), commit {m['commit']} "
        f"({m.get('build', 'release')} build), {m['nginx']}. Servers pinned to CPU "
        f"{SERVER_CPU}, load generator to CPU {LOAD_CPU}; medians of {m['rounds']} alternating "
        f"rounds ({m.get('eq_rounds', m['rounds'])} at equal load); hit runs are "
        f"`wrk -t1 -c{m['connections']} -d{m['duration']}` on one cached {r['body_bytes']}-byte "
        f"list.",
        "",
        "| scenario | gateway | nginx proxy_cache | static file | gateway / nginx |",
        "|---|---|---|---|---|",
        f"| hit, plain, saturated: requests/s (median, rounds min to max) | "
        f"{rps_range(r, 'hit_plain', 'gateway')} | {rps_range(r, 'hit_plain', 'nginx')} | "
        f"{rps_range(r, 'hit_plain', 'static')} | {s['ratios']['hit_rps_plain']:.2f}x |",
        f"| hit, plain, saturated: server CPU per request, us | "
        f"{us_range(r, 'hit_plain', 'gateway')} | {us_range(r, 'hit_plain', 'nginx')} | "
        f"{us_range(r, 'hit_plain', 'static')} | |",
        f"| hit, plain: p50 / p99 ms | {hp['gateway']['p50_ms']:.2f} / {hp['gateway']['p99_ms']:.2f} | "
        f"{hp['nginx']['p50_ms']:.2f} / {hp['nginx']['p99_ms']:.2f} | "
        f"{hp['static']['p50_ms']:.2f} / {hp['static']['p99_ms']:.2f} | |",
        f"| hit, plain: server CPU (1.0 = one core busy) | {hp['gateway']['server_cpu']:.2f} | "
        f"{hp['nginx']['server_cpu']:.2f} | {hp['static']['server_cpu']:.2f} | |",
        f"| hit, TLS, saturated: requests/s (median, rounds min to max) | "
        f"{rps_range(r, 'hit_tls', 'gateway')} | {rps_range(r, 'hit_tls', 'nginx')} | | "
        f"{s['ratios']['hit_rps_tls']:.2f}x |",
        f"| hit, TLS, saturated: server CPU per request, us | "
        f"{us_range(r, 'hit_tls', 'gateway')} | {us_range(r, 'hit_tls', 'nginx')} | | |",
        f"| hit, TLS: server CPU | {ht['gateway']['server_cpu']:.2f} | "
        f"{ht['nginx']['server_cpu']:.2f} | | |",
        f"| hit, TLS: p50 / p99 ms | {ht['gateway']['p50_ms']:.2f} / {ht['gateway']['p99_ms']:.2f} | "
        f"{ht['nginx']['p50_ms']:.2f} / {ht['nginx']['p99_ms']:.2f} | | |",
    ]
    if "new_connections" in s:
        def cell(v, digits):
            return f"{v['median']:,.{digits}f} ({v['min']:,.{digits}f} to {v['max']:,.{digits}f})"
        for mode, label in (("plain", "plain"), ("tls", "TLS")):
            g, n = s["new_connections"][mode]["gateway"], s["new_connections"][mode]["nginx"]
            lines += [
                f"| new connection per request, {label}: requests/s | {cell(g['rps'], 0)} | "
                f"{cell(n['rps'], 0)} | | {g['rps']['median'] / n['rps']['median']:.2f}x |",
                f"| new connection per request, {label}: server CPU per request, us (kernel) | "
                f"{cell(g['us'], 1)} ({g['kernel_us']['median']:.1f}) | "
                f"{cell(n['us'], 1)} ({n['kernel_us']['median']:.1f}) | | |"]
    lines += [
        f"| cold-miss storm ({STORM} clients, box {STORM_DELAY_MS} ms): upstream requests | "
        f"{st['gateway']['upstream_requests']} | {st['nginx']['upstream_requests']} | | |",
        f"| cold-miss storm: client p50 / p99 ms | {st['gateway']['p50_ms']:.0f} / "
        f"{st['gateway']['p99_ms']:.0f} | {st['nginx']['p50_ms']:.0f} / {st['nginx']['p99_ms']:.0f} "
        f"| | |",
        f"| miss overhead over a direct request, p50 ms (rounds) | {mo['gateway']:.3f} "
        f"({min(s['miss_overhead_rounds']['gateway']):.3f} to "
        f"{max(s['miss_overhead_rounds']['gateway']):.3f}) | {mo['nginx']:.3f} "
        f"({min(s['miss_overhead_rounds']['nginx']):.3f} to "
        f"{max(s['miss_overhead_rounds']['nginx']):.3f}) | | |",
    ]
    if "miss_floor_ms" in s:
        def of_rounds(v):
            return f"{v['median']:.3f} ({v['min']:.3f} to {v['max']:.3f})"
        lines += [
            f"| the same keys again as hits, p50 ms (rounds) | "
            f"{of_rounds(s['miss_hit_p50_ms']['gateway'])} | {of_rounds(s['miss_hit_p50_ms']['nginx'])} "
            f"| | |",
            f"| miss overhead's floor here: hit + request to the box from the servers' core - "
            f"direct, ms | {of_rounds(s['miss_floor_ms']['gateway'])} | "
            f"{of_rounds(s['miss_floor_ms']['nginx'])} | | |",
            f"| miss overhead above that floor (the proxy's own work), ms | "
            f"{of_rounds(s['miss_own_ms']['gateway'])} | {of_rounds(s['miss_own_ms']['nginx'])} | | |",
        ]
    if "miss_cpu_us" in s:
        def cpu(name):
            c = s["miss_cpu_us"][name]
            return (f"{c['all']['median']:.0f} ({c['all']['min']:.0f} to {c['all']['max']:.0f}; "
                    f"kernel {c['kernel']['median']:.0f})")
        lines.append(f"| CPU per miss, us (rounds; the kernel's part), /proc/PID/stat | "
                     f"{cpu('gateway')} | {cpu('nginx')} | | |")
    if "miss_halts" in s:
        def halted(kind):
            h = s["miss_halts"][kind]
            return f"{h['servers']:.2f} / {h['load']:.2f}"
        lines.append(
            f"| halts per request (cpuidle), servers' core / load core: miss; hit on the same keys "
            f"| {halted('gateway')}; {halted('gateway_hits')} | {halted('nginx')}; "
            f"{halted('nginx_hits')} | | |")
    lines += [
        f"| memory (max_bytes {s['memory']['max_bytes_mib']:g} MiB, box writing in pieces): RSS "
        f"idle / after {FILL_UNKNOWN:,} 404s / after {FILL_AGENTS:,} lists | "
        f"{s['memory']['rss_idle_mib']} / {s['memory']['rss_404s_mib']} / "
        f"{s['memory']['rss_mib']} MiB ({s['memory']['entries']:,} entries, "
        f"{s['memory']['cached_mib']} MiB weighed) | | | |",
        f"| upstream outage ({OUTAGE_SECONDS} s, {OUTAGE_KEYS} cached keys): failed / stale / all "
        f"requests | {s['outage']['failed']} / {s['outage']['stale_served']:,} / "
        f"{s['outage']['n']:,} | | | |",
        "",
        loadgen_sentence(s),
        "",
        stolen_sentence(s),
        "",
    ]
    lines += equal_tables(s, m)
    lines += [
        "",
        f"Poller: {POLL_AGENTS * POLLERS_PER_AGENT} clients poll {POLL_AGENTS} agents every second "
        f"with a rising `fromQueueCallId` while the box records a new call every "
        f"{NEW_CALL_EVERY_S} s; `ttl = \"{POLL_TTL_S}s\"`, {m.get('poll_seconds', POLL_SECONDS)} s per run. The box's "
        f"side, per minute:",
        "",
        "| poller | delta refresh (full_refresh_interval 15m) | full refreshes only (0s) | full / delta |",
        "|---|---|---|---|",
        f"| upstream requests / min | {pd['upstream_calls_per_min']:,} | "
        f"{pf['upstream_calls_per_min']:,} | |",
        f"| upstream list bytes / min | {pd['upstream_bytes_per_min']:,} | "
        f"{pf['upstream_bytes_per_min']:,} | "
        f"{pf['upstream_bytes_per_min'] / max(pd['upstream_bytes_per_min'], 1):.1f}x |",
        f"| client polls / min (answered from memory) | {pd['client_polls_per_min']:,} | "
        f"{pf['client_polls_per_min']:,} | |",
        f"| new calls / calls a client missed | {pd['new_calls']} / {pd['missed_by_clients']} | "
        f"{pf['new_calls']} / {pf['missed_by_clients']} | |",
        "",
        "| goal | met | measured |",
        "|---|---|---|",
    ]
    lines += [f"| {goal} | {'yes' if ok else '**no**'} | {value} |" for goal, ok, value in s["goals"]]
    return "\n".join(lines) + "\n"


def rps_range(r, scenario, name):
    values = [x["rps"] for x in r[scenario][name]]
    return f"{statistics.median(values):,.0f} ({min(values):,.0f} to {max(values):,.0f})"


def us_range(r, scenario, name):
    values = [x["server_us_per_request"] for x in r[scenario][name] if "server_us_per_request" in x]
    if not values:
        return ""
    return f"{statistics.median(values):.1f} ({min(values):.1f} to {max(values):.1f})"


def loadgen_sentence(s):
    """How many saturated runs were held back by wrk's own core and whose runs they were, the
    most one wrk core can drive, and the bound each server's own CPU per request sets."""
    busy = s["loadgen_busy_rounds"]
    by_server = s.get("loadgen_busy_by_server", {})

    def whose(mode):
        named = [f"{name} {n}" for name, n in by_server.get(mode, {}).items() if n]
        return f" ({', '.join(named)})" if named else ""

    sentence = (f"wrk's own core was at least {LOADGEN_BUSY} busy in {busy['plain']} of the "
                f"plain{whose('plain')} and {busy['tls']} of the TLS{whose('tls')} saturated "
                f"runs: those rates may be the load generator's, not the server's")
    others = [n for mode in by_server.values() for name, n in mode.items() if name != "gateway"]
    if busy["plain"] + busy["tls"] and not any(others):
        sentence += (", and since only the gateway's runs were held back, its throughput "
                     "ratios are lower bounds")
    sentence += "."
    ceiling = s.get("loadgen_ceiling", {})
    if set(ceiling) == {"plain", "tls"}:
        p, t = ceiling["plain"], ceiling["tls"]
        sentence += (f" In the gateway's runs wrk spent {p['wrk_us_per_request']:.1f} us of its "
                     f"core per plain request and {t['wrk_us_per_request']:.1f} us per TLS "
                     f"request (medians), so one wrk core can drive at most about "
                     f"{p['max_rps']:,.0f} and {t['max_rps']:,.0f} requests/s: "
                     f"{p['over_nginx']:.2f}x and {t['over_nginx']:.2f}x nginx's median rate, "
                     f"the highest ratios to nginx that any server could show in this layout.")
    plain, tls = s["hit_plain"], s["hit_tls"]
    if all("server_us_per_request" in mode[name] for mode in (plain, tls)
           for name in ("gateway", "nginx")):
        cost = {mode: (figures["gateway"]["server_us_per_request"],
                       figures["nginx"]["server_us_per_request"])
                for mode, figures in (("plain", plain), ("tls", tls))}

        def verdict(mode, label):
            ratio = cost[mode][1] / cost[mode][0]
            if ratio >= GOAL_SATURATED:
                reach = (f", beyond the {ceiling[mode]['over_nginx']:.2f}x one wrk core can drive "
                         f"here" if mode in ceiling else "")
                return f"{ratio:.2f}x {label}, which meets {GOAL_SATURATED}x{reach}"
            return f"{ratio:.2f}x {label}, short of {GOAL_SATURATED}x"

        sentence += (f" The server's side bounds it too: at saturation the gateway's core spent "
                     f"{cost['plain'][0]:.2f} us per plain request against nginx's "
                     f"{cost['plain'][1]:.2f}, and {cost['tls'][0]:.2f} against "
                     f"{cost['tls'][1]:.2f} us with TLS (medians). One core serves at most the "
                     f"inverse of that cost, so a load generator without a ceiling would find "
                     f"the gateway faster than nginx by about {verdict('plain', 'on plain HTTP')}; "
                     f"{verdict('tls', 'with TLS')}.")
    return sentence


def stolen_sentence(s):
    """How often the host took a benchmark core's time during the runs."""
    kinds = (("saturated", "saturated runs"), ("equal", "equal-load runs"),
             ("miss", "miss rounds"))
    counts = {kind: s.get("stolen", {}).get(kind, [0, 0, 0]) for kind, _ in kinds}
    if not any(c[1] for c in counts.values()):
        return "Steal time (the host taking a benchmark core) was not recorded in this run."
    largest = max(c[2] for c in counts.values())
    if not any(c[0] for c in counts.values()):
        return (f"The host took {STOLEN:.0%} or more of a benchmark core (steal time in "
                f"/proc/stat) in none of the runs; the most it took of any one run was "
                f"{largest:.1%}.")
    listed = ", ".join(f"{counts[kind][0]} of the {counts[kind][1]} {label}"
                       for kind, label in kinds)
    return (f"The host took at least {STOLEN:.0%} of a benchmark core (steal time in /proc/stat) "
            f"in {listed}, at most {largest:.0%} of one run; a contended run measures the "
            f"host's other tenants as much as the servers.")


def equal_tables(s, m):
    """The equal-load tables: per offered rate and server, CPU per request and latencies."""
    lines = []
    for mode, eq in s["equal"].items():
        label = "plain HTTP" if mode == "plain" else "TLS"
        lines += [
            f"Equal offered load, {label}: open loop (`probe rate`), {CONNECTIONS} keep-alive "
            f"connections, the rates {', '.join(f'{x:,}' for x in eq['rates'])} requests/s "
            f"({', '.join(f'{int(share * 100)}%' for share in EQ_SHARES)} of the slowest "
            f"saturated rate, {eq['slowest']:,.0f}), {m.get('eq_rounds', m['rounds'])} "
            f"alternating rounds of {m.get('eq_seconds', EQ_SECONDS):g} s each; median (min to max over the rounds). "
            f"The last column is the ratio of the two medians, with the range of each round's "
            f"own ratio (the two servers' runs of one round saw the same host).",
            "",
            "| offered /s | server | CPU per request, us | of it in the kernel, us | p50 ms | "
            "p99 ms | p99.9 ms | achieved /s | nginx CPU / gateway CPU |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rate in eq["rates"]:
            for name, row in eq["rows"][rate].items():
                def cell(value, digits):
                    return (f"{value['median']:.{digits}f} ({value['min']:.{digits}f} to "
                            f"{value['max']:.{digits}f})")
                busy = f" ({row['busy_rounds']} rounds generator-bound)" if row["busy_rounds"] else ""
                if row.get("stolen_rounds"):
                    busy += f" ({row['stolen_rounds']} rounds contended)"
                rounds = eq["cpu_ratio_rounds"][rate]
                ratio = (f"{eq['cpu_ratio'][rate]:.2f}x (rounds {min(rounds):.2f} to "
                         f"{max(rounds):.2f})" if name == "gateway" else "")
                lines.append(
                    f"| {rate:,} | {name}{busy} | {cell(row['cpu'], 1)} | "
                    f"{cell(row['kernel'], 1)} | {cell(row['p50'], 3)} | "
                    f"{cell(row['p99'], 3)} | {cell(row['p999'], 3)} | {row['achieved']:,.0f} | "
                    f"{ratio} |")
        lines.append("")
    return lines


def chart(s, path, m):
    """Ratios with higher better for the gateway: each bar the median, its whisker the range of
    the rounds' own ratios, its goal in red, and in grey, where the layout has one, the highest
    ratio any server could show here (one wrk core's ceiling, or the floor of a miss)."""
    data = os.path.join(tempfile.mkdtemp(), "ratios.dat")
    ceiling = {mode: c["over_nginx"] for mode, c in s.get("loadgen_ceiling", {}).items()}
    static_over_nginx = s["hit_plain"]["static"]["rps"] / s["hit_plain"]["nginx"]["rps"]
    # (label, median, rounds, goal, ceiling or None)
    rows = [("hit req/s plain\\nsaturated", s["ratios"]["hit_rps_plain"],
             s["ratio_rounds"]["hit_rps_plain"], GOAL_SATURATED, ceiling.get("plain")),
            ("hit req/s TLS\\nsaturated", s["ratios"]["hit_rps_tls"],
             s["ratio_rounds"]["hit_rps_tls"], GOAL_SATURATED, ceiling.get("tls")),
            ("hit req/s\\nvs static file", s["ratios"]["hit_rps_vs_static"],
             s["ratio_rounds"]["hit_rps_vs_static"], GOAL_STATIC,
             ceiling["plain"] / static_over_nginx if "plain" in ceiling else None)]
    for mode, eq in s["equal"].items():
        for share, rate in zip(EQ_SHARES, eq["rates"]):
            rows.append((f"CPU/request {mode}\\n{int(share * 100)}% load",
                         round(eq["cpu_ratio"][rate], 2), eq["cpu_ratio_rounds"][rate], GOAL_CPU,
                         None))
    overhead = max(s["miss_overhead_ms"]["gateway"], 0.001)
    floor = s.get("miss_floor_ms", {}).get("gateway", {}).get("median")
    rows.append(("miss overhead\\n0.1 ms / gateway's", round(GOAL_MISS_MS / overhead, 2),
                 [GOAL_MISS_MS / max(x, 0.001) for x in s["miss_overhead_rounds"]["gateway"]],
                 1.0, GOAL_MISS_MS / floor if floor else None))
    storm = s["ratios"]["storm_p99_nginx_over_gateway"]
    rows.append(("storm p99", storm, [storm], 1.0, None))
    with open(data, "w") as f:
        for i, (label, value, rounds, _, _) in enumerate(rows):
            f.write(f'{i} "{label}" {value} {min(rounds)} {max(rounds)}\n')
    top = max(max(value, max(rounds), goal, limit or 0)
              for _, value, rounds, goal, limit in rows) * 1.15
    marks = [f'set arrow from {i - 0.4},{goal} to {i + 0.4},{goal} nohead lw 3 lc rgb "#aa0000"'
             for i, (_, _, _, goal, _) in enumerate(rows)]
    marks += [f'set arrow from {i - 0.4},{limit} to {i + 0.4},{limit} nohead lw 2 dt 2 '
              f'lc rgb "#777777"' for i, (_, _, _, _, limit) in enumerate(rows) if limit]
    title = (f"miralix-gateway against nginx proxy_cache (ratios, higher is better for the "
             f"gateway; bar: median, whisker: range of the rounds; red: goal; grey dashes: the "
             f"most any server could show in this layout)\\n{m['date']}, commit {m['commit']} "
             f"({m.get('build', 'release')} build), {m['cpu']} ({m['cores']} cores)")
    marks = "\n".join(marks)
    script = f"""
set terminal pngcairo size 1500,580 font "sans,10"
set output "{path}"
set title "{title}" noenhanced
set bmargin 6
set style fill solid 0.8
set boxwidth 0.6
set yrange [0:{top}]
set grid ytics
set xtics nomirror noenhanced
set key off
{marks}
plot "{data}" using 1:3:xtic(2) with boxes lc rgb "#2a6f97", \\
     "" using 1:4:(0):($5 - $4) with vectors heads size 0.08,90 lc rgb "#102a3a" lw 1.5, \\
     "" using 1:5:(sprintf("%.2fx", $3)) with labels offset 0,1
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def cpu_compared(gateway_us, nginx_us, what):
    """Which server spent more CPU `what`, as a multiple of the other's."""
    if nginx_us >= gateway_us:
        return f"nginx spent {nginx_us / gateway_us:.2f}x the gateway's CPU {what}"
    return f"the gateway spent {gateway_us / nginx_us:.2f}x nginx's CPU {what}"


def prose(s, m):
    """The README's summary of the latest run, written from the results, never by hand."""
    ratios, storm, mem, outage = s["ratios"], s["storm"], s["memory"], s["outage"]
    g, n = s["hit_plain"]["gateway"], s["hit_plain"]["nginx"]
    pd, pf = s["poller"]["delta"], s["poller"]["full"]
    eq_plain = s["equal"].get("plain")
    if eq_plain:
        rows = eq_plain["rows"]

        def p99s(rate):
            return (f"{rate:,}/s ({rows[rate]['gateway']['p99']['median']:.2f} against "
                    f"{rows[rate]['nginx']['p99']['median']:.2f} ms)")

        above = [rate for rate in eq_plain["rates"]
                 if rows[rate]["gateway"]["p99"]["median"] > rows[rate]["nginx"]["p99"]["median"]]
        below = [rate for rate in eq_plain["rates"] if rate not in above]
        p99_text = (f"at equal offered load (plain HTTP) nginx spent "
                    f"{min(eq_plain['cpu_ratio'].values()):.2f}x to "
                    f"{max(eq_plain['cpu_ratio'].values()):.2f}x the gateway's CPU per request, "
                    f"and the gateway's p99 was ")
        if above:
            p99_text += "above nginx's at " + " and ".join(map(p99s, above))
            if below:
                p99_text += ", at or below it at " + " and ".join(map(p99s, below))
        else:
            p99_text += "at or below nginx's at every rate"
    else:
        p99_text = f"a saturated p99 of {g['p99_ms']:.2f} against {n['p99_ms']:.2f} ms"
    miss_cpu_text = ""
    if "miss_cpu_us" in s:
        miss_cpu_text = (" and " + cpu_compared(
            s["miss_cpu_us"]["gateway"]["all"]["median"],
            s["miss_cpu_us"]["nginx"]["all"]["median"], "per miss")
            + " (the gateway makes its gzip copy, the parse into elements and the ETag once per "
              "fetched list)")
    fresh_text = ""
    if "new_connections" in s:
        fresh = s["new_connections"]
        fresh_text = ("; with a new connection for each request (no keep-alive), " + ", and ".join(
            cpu_compared(fresh[mode]["gateway"]["us"]["median"],
                         fresh[mode]["nginx"]["us"]["median"], f"per request {label}")
            for mode, label in (("plain", "on plain HTTP"), ("tls", "with TLS"))))
    requests = storm["gateway"]["upstream_requests"]
    missed_calls = pd["missed_by_clients"] + pf["missed_by_clients"]
    missed = [goal for goal, ok, _ in s["goals"] if not ok]
    text = (
        f"In the latest run (the gateway's {m.get('build', 'release')} build): hits at "
        f"{ratios['hit_rps_plain']:.2f}x nginx's throughput on plain HTTP "
        f"({ratios['hit_rps_tls']:.2f}x with TLS) and {ratios['hit_rps_vs_static']:.2f}x the static-file "
        f"reference (saturated, medians of the rounds); {p99_text}{fresh_text}; a "
        f"{STORM}-client cold-miss storm sends the box {requests} "
        f"request{'s' if requests != 1 else ''} and answers every client within "
        f"{storm['gateway']['p99_ms']:.0f} ms (nginx: {storm['nginx']['p99_ms']:.0f} ms, its lock "
        f"waiters poll); a miss adds {s['miss_overhead_ms']['gateway']:.3f} ms over a direct "
        f"request (nginx: {s['miss_overhead_ms']['nginx']:.3f} ms){miss_cpu_text}; with "
        f"`max_bytes` "
        f"{mem['max_bytes_mib']:g} MiB and a box writing each answer in pieces, the resident set "
        f"was {mem['rss_404s_mib']} MiB after {FILL_UNKNOWN:,} distinct `404`s and "
        f"{mem['rss_mib']} MiB after {FILL_AGENTS:,} distinct lists (promised: at most "
        f"{mem['limit_mib']} MiB); during a {OUTAGE_SECONDS} s outage of the box, "
        f"{outage['failed']:,} of {outage['n']:,} reads of cached keys failed; and "
        f"{POLL_AGENTS * POLLERS_PER_AGENT} clients polling with a rising `fromQueueCallId` cost the "
        f"box {pf['upstream_bytes_per_min'] / max(pd['upstream_bytes_per_min'], 1):.0f}x fewer bytes with "
        f"delta refresh than with full refreshes, with {missed_calls} new calls missed by a client. "
    )
    if missed:
        text += ("Goals not met: " + "; ".join(missed) + ". Why, and what was tried, is in "
                 "[`bench/README.md`](bench/README.md).")
    else:
        text += "Every goal in [`bench/README.md`](bench/README.md) was met."
    return text


def split(row):
    """Where a rate's CPU per request went, kernel and user space, gateway against nginx."""
    if "kernel" not in row["gateway"]:
        return ""
    gk, nk = row["gateway"]["kernel"]["median"], row["nginx"]["kernel"]["median"]
    gu, nu = row["gateway"]["cpu"]["median"] - gk, row["nginx"]["cpu"]["median"] - nk
    text = (f": {gk:.1f} against {nk:.1f} us in the kernel ({gk / nk:.2f}x nginx's) and "
            f"{gu:.1f} against {nu:.1f} us in user space ({gu / nu:.2f}x)")
    if gk < nk and gu > nu:
        text += ", so the kernel work is where the gateway saves, and user space where it spends more"
    return text


def reading(s):
    """bench/README's reading of the latest run, every figure from the results."""
    missed = [goal for goal, ok, _ in s["goals"] if not ok]
    held = [goal for goal, ok, _ in s["goals"] if ok]
    pd, pf = s["poller"]["delta"], s["poller"]["full"]
    parts = [
        f"**Goals.** {len(held)} of {len(s['goals'])} hold in the latest run. "
        + (f"Missed: {'; '.join(missed)}." if missed else "None is missed.") + " "
        + stolen_sentence(s),
    ]
    for mode, eq in s["equal"].items():
        label = "plain HTTP" if mode == "plain" else "TLS"
        ratios = [eq["cpu_ratio"][rate] for rate in eq["rates"]]
        lowest = eq["rates"][ratios.index(min(ratios))]
        gw, ng = eq["rows"][lowest]["gateway"]["cpu"], eq["rows"][lowest]["nginx"]["cpu"]
        parts.append(
            f"**Equal load, {label}.** At {', '.join(f'{rate:,}' for rate in eq['rates'])} "
            f"requests/s nginx spent {', '.join(f'{v:.2f}x' for v in ratios)} the gateway's CPU "
            f"per request (medians of the rounds). The lowest ratio, at {lowest:,}/s, came from "
            f"{gw['median']:.1f} us per request for the gateway (rounds {gw['min']:.1f} to "
            f"{gw['max']:.1f}) against {ng['median']:.1f} us for nginx ({ng['min']:.1f} to "
            f"{ng['max']:.1f})" + split(eq["rows"][lowest]) + ".")
    parts.append(
        "The busier a server, the more requests it handles per wake-up, which is why CPU per "
        "request falls as the offered rate rises, and why saturated requests/s alone cannot "
        "compare the two servers.")
    sat = s["ratio_rounds"]
    parts.append(
        f"**Saturated throughput** (wrk, closed loop): {s['ratios']['hit_rps_plain']:.2f}x nginx on "
        f"plain HTTP (rounds {min(sat['hit_rps_plain']):.2f} to {max(sat['hit_rps_plain']):.2f}) "
        f"and {s['ratios']['hit_rps_tls']:.2f}x with TLS (rounds {min(sat['hit_rps_tls']):.2f} to "
        f"{max(sat['hit_rps_tls']):.2f}). " + loadgen_sentence(s))
    if "new_connections" in s:
        parts.append(new_connections_sentence(s))
    mp = s["miss_p50_ms"]
    floor = mp["direct_cross"]["median"] - mp["direct"]["median"]
    parts.append(
        f"**A miss** added {s['miss_overhead_ms']['gateway']:.3f} ms at the median over a direct "
        f"request to the box (rounds {min(s['miss_overhead_rounds']['gateway']):.3f} to "
        f"{max(s['miss_overhead_rounds']['gateway']):.3f}; nginx: "
        f"{s['miss_overhead_ms']['nginx']:.3f} ms). The direct request runs on the box's core, "
        f"like every client here, in {mp['direct']['median']:.3f} ms; the same request from the "
        f"servers' core, the way a proxy's own request to the box travels, took "
        f"{mp['direct_cross']['median']:.3f} ms ({mp['direct_cross']['min']:.3f} to "
        f"{mp['direct_cross']['max']:.3f}). So {floor:.3f} ms of a proxy's miss is that core "
        f"crossing alone, before the client's own hop to the proxy and back, which crosses "
        f"cores too. " + miss_floor_sentence(s) + halts_sentence(s) + miss_cpu_sentence(s)
        + "The waiting clients are answered as soon as the box's bytes are checked; "
        f"the gzip copy and the parse into elements follow on a thread at the lowest CPU "
        f"priority (nice 19), so the next request takes the core from them at once.")
    parts.append(
        f"**The poller scenario** shows what no URL-keyed cache can do: "
        f"{pd['client_polls_per_min']:,} client polls a minute became "
        f"{pd['upstream_calls_per_min']:,} upstream requests with delta refresh and "
        f"{pf['upstream_calls_per_min']:,} with full refreshes, and the box sent "
        f"{pf['upstream_bytes_per_min'] / max(pd['upstream_bytes_per_min'], 1):.0f}x fewer bytes "
        f"with delta refresh ({pd['upstream_bytes_per_min']:,} against "
        f"{pf['upstream_bytes_per_min']:,} bytes a minute). A full refresh costs the length of the "
        f"history, a delta the new calls only. {pd['missed_by_clients'] + pf['missed_by_clients']} "
        f"new calls were missed by a client.")
    return "\n\n".join(parts)


def spread(values, digits=2):
    """The median of `values` with their range, as the tables and history rows write it."""
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f} to {max(values):.{digits}f})")


def describe_ab(data, names):
    """The rounds ab.py --json wrote (`data`) as one sentence: the effect cell of a history row,
    each build named by names[label] (or its label)."""
    runs = data["runs"]

    def per_build(by_server, where):
        """nginx's CPU per request, then each build's with nginx's over it."""
        cpu = {name: [o["server_us_per_request"] for o in outcomes]
               for name, outcomes in by_server.items()}
        bits = [f"{where}nginx {spread(cpu['nginx'])} us"] if "nginx" in cpu else []
        for name, values in cpu.items():
            if name == "nginx":
                continue
            user = [o["server_us_per_request"] - o["server_kernel_us_per_request"]
                    for o in by_server[name]]
            p99 = statistics.median(o["p99_ms"] for o in by_server[name])
            ratio = (f"{statistics.median(cpu['nginx']) / statistics.median(values):.2f}x; "
                     if "nginx" in cpu else "")
            bits.append(f"{names.get(name, name)} {spread(values)} ({ratio}user space "
                        f"{statistics.median(user):.2f} us, p99 {p99:.2f} ms)")
        return ", ".join(bits)

    if data["scenario"] == "hits" and data.get("close"):
        by_server = runs["close"]
        return (f"{'TLS' if data['tls'] else 'Plain'} hits, each on a new connection (wrk -c64, "
                f"`Connection: close`), {len(next(iter(by_server.values())))} rotating rounds, "
                f"CPU per request at the median (min to max) and nginx's over each build's: "
                + per_build(by_server, ""))
    if data["scenario"] == "hits":
        parts = []
        for rate, by_server in runs.items():
            rounds = len(next(iter(by_server.values())))
            parts.append(per_build(by_server, f"at {int(rate):,}/s "))
        seconds = statistics.median(o["seconds"] for by_server in runs.values()
                                    for outcomes in by_server.values() for o in outcomes)
        return (f"{'TLS' if data['tls'] else 'Plain'} hits, {rounds} rotating rounds of "
                f"{seconds:.0f} s, CPU per request at the median (min to max) and nginx's over "
                f"each build's: " + "; ".join(parts))
    if data["scenario"] == "instructions":
        first = next(iter(runs.values()))
        counted = {name: [o["instructions_per_request"] for o in outcomes]
                   for name, outcomes in runs.items()}
        nginx = statistics.median(counted["nginx"]) if "nginx" in counted else None
        counts = [f"{names.get(name, name)} {statistics.median(values):,.0f} ({min(values):,} to "
                  f"{max(values):,}"
                  + (f"; {statistics.median(values) / nginx:.2f}x nginx's"
                     if nginx and name != "nginx" else "") + ")"
                  for name, values in counted.items()]
        each = (f"new connection with one plain hit (callgrind, {len(first)} rounds of "
                f"{first[0]['n']:,} at once)" if data.get("new_connections") else
                f"plain hit (callgrind, {len(first)} rounds of {first[0]['n']:,} hits at "
                f"{first[0]['offered_rps']:,.0f}/s)")
        return (f"User-space instructions per {each}, median (min to max): "
                + ", ".join(counts))
    direct = [o["p50_ms"] for o in runs["direct"]]
    overheads = [f"{names.get(name, name)} "
                 f"{spread([o['p50_ms'] - d for o, d in zip(outcomes, direct)], 3)} ms"
                 for name, outcomes in runs.items() if not name.startswith("direct")]
    return (f"Sequential misses, {len(direct)} rotating rounds of {runs['direct'][0]['n']}: "
            f"overhead over a direct request at the median (min to max), " + ", ".join(overheads))


# The goals a whole run is judged by in history.json's row of whole runs (`runs`).
RUN_GOALS = {"plain_cpu": cpu_goal("plain"), "plain_p99": p99_goal("plain"),
             "static": STATIC_GOAL}


def whole_run(latest, label):
    """What the row of whole runs keeps of one run: its results (latest.json as bench.py wrote
    it) reduced to the figures the row shows."""
    m, s = latest["raw"]["machine"], latest["summary"]
    met = {goal: ok for goal, ok, _ in s["goals"]}
    return {
        "date": m["date"], "commit": m["commit"], "label": label,
        "goals_met": sum(met.values()), "goals": len(met),
        # As the results print them: ratios to two places.
        **{mode: [round(eq["cpu_ratio"][str(rate)], 2) for rate in eq["rates"]]
           for mode, eq in s["equal"].items()},
        "saturated_plain": round(s["ratios"]["hit_rps_plain"], 2),
        "saturated_tls": round(s["ratios"]["hit_rps_tls"], 2),
        "static": round(s["ratios"]["hit_rps_vs_static"], 2),
        "miss_ms": s["miss_overhead_ms"]["gateway"], "miss_nginx_ms": s["miss_overhead_ms"]["nginx"],
        "met": {key: met[goal] for key, goal in RUN_GOALS.items()},
    }


def whole_runs_text(runs):
    """The row of whole runs: each run, then what the runs of each build had in common."""
    def ratios(values):
        return "/".join(f"{v:.2f}" for v in values) + "x"
    text = "; ".join(
        f"{run['date'].split()[1]} UTC at {run['commit']} ({run['label']}): {run['goals_met']} of "
        f"{run['goals']} goals; equal-load CPU, nginx's over the gateway's at 25/50/75% load, "
        f"plain {ratios(run['plain'])}, TLS {ratios(run['tls'])}; saturated plain "
        f"{run['saturated_plain']:.2f}x, TLS {run['saturated_tls']:.2f}x, static "
        f"{run['static']:.2f}x; miss overhead {run['miss_ms']:.3f} ms (nginx "
        f"{run['miss_nginx_ms']:.3f})" for run in runs)
    builds = {}
    for run in runs:
        builds.setdefault(run["label"].split(",")[0], []).append(run)
    summaries = []
    for build, of_build in builds.items():
        plain = [v for run in of_build for v in run["plain"]]
        tls = [v for run in of_build for v in run["tls"]]
        count = len(of_build)
        def held(key):
            return sum(run["met"][key] for run in of_build)
        summaries.append(
            f"the {count} runs of the {build}: equal-load CPU ratios plain {min(plain):.2f}x to "
            f"{max(plain):.2f}x, TLS {min(tls):.2f}x to {max(tls):.2f}x; the plain CPU goal met "
            f"at every rate in {held('plain_cpu')} of {count}, the plain p99 goal in "
            f"{held('plain_p99')}, the static-file goal in {held('static')}")
    return text + ". Over " + "; over ".join(summaries)


def add_whole_run(label):
    """The run in results/latest.json, appended to history.json's row of whole runs, and the
    history table in bench/README.md written again."""
    with open(os.path.join(RESULTS, "latest.json")) as f:
        run = whole_run(json.load(f), label)
    path = os.path.join(RESULTS, "history.json")
    with open(path) as f:
        history = json.load(f)
    row = next(change for change in history["changes"] if "runs" in change)
    if any(old["date"] == run["date"] and old["commit"] == run["commit"] for old in row["runs"]):
        sys.exit(f"the run of {run['date']} at {run['commit']} is in the row already")
    row["runs"].append(run)
    with open(path, "w") as f:
        f.write(json.dumps(history, indent=2, ensure_ascii=False) + "\n")
    replace_block(os.path.join(BENCH, "README.md"), "history", history_table())
    print(f"history: the run of {run['date']} at {run['commit']} added as '{label}'")


def history_table():
    """What earlier changes measured, from bench/results/history.json: a row with `rounds` has
    its effect written here from the rounds ab.py --json kept (in results/ab/); the row with
    `runs` (whole runs, added with `bench.py --history-run LABEL`) from those runs' figures."""
    with open(os.path.join(RESULTS, "history.json")) as f:
        changes = json.load(f)["changes"]
    lines = ["| change | effect (same machine, A/B in alternation, at the time) | kept |",
             "|---|---|---|"]
    for change in changes:
        kept = {True: "kept", False: "reverted", None: "no change made"}[change["kept"]]
        if change.get("why"):
            kept += f": {change['why']}"
        measured = change.get("measured", "")
        if change.get("runs"):
            measured = whole_runs_text(change["runs"]) + (f". {measured}" if measured else "")
        for rounds in change.get("rounds", []):
            with open(os.path.join(RESULTS, rounds["file"])) as f:
                measured += (". " if measured else "") + describe_ab(json.load(f), rounds["names"])
        lines.append(f"| {change['change']} | {measured} | {kept} |")
    return "\n".join(lines)


def replace_block(path, name, block):
    """Put `block` between the `<!-- name:start -->` and `<!-- name:end -->` markers."""
    with open(path) as f:
        text = f.read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = re.sub(re.escape(start) + ".*?" + re.escape(end),
                  lambda _: f"{start}\n{block}\n{end}", text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)


def latest_md(table):
    return "# Latest benchmark results\n\n" + table


def blocks(r, s, table):
    """Every block of the documents written from a run's results (`table` its markdown):
    (file, block name, text)."""
    readme = os.path.join(BENCH, "README.md")
    return [(readme, "results", f"{table}\n![gateway relative to nginx](results/ratios.png)"),
            (readme, "reading", reading(s)),
            (readme, "history", history_table()),
            (os.path.join(ROOT, "README.md"), "summary", prose(s, r["machine"]))]


def write_results(r):
    os.makedirs(RESULTS, exist_ok=True)
    s = summarize(r)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump({"raw": r, "summary": s}, f, indent=2)
    table = markdown(r, s)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(latest_md(table))
    chart(s, os.path.join(RESULTS, "ratios.png"), r["machine"])
    for path, name, text in blocks(r, s, table):
        replace_block(path, name, text)
    print(table)
    missed = [goal for goal, ok, _ in s["goals"] if not ok]
    log("all goals met" if not missed else f"goals missed: {missed}")


if __name__ == "__main__":
    main()
