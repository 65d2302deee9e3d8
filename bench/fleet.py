#!/usr/bin/env python3
"""The second tier's rows of the benchmark: a fleet on one Redis, and a restart on the disk tier.

Fleet: three gateways (release build) share one redis-server in front of the simulated box.
  - cold storm: STORM clients spread over the three instances ask for one uncached agent at once
    (the box answers after STORM_DELAY_MS): box requests, client p50/p99; ROUNDS rounds, each
    on a new agent;
  - shared hit against memory hit: instance A fetches SHARED_KEYS agents, instance B reads each
    once (every read a shared-tier hit, one Redis round trip), then again (memory hits);
    the added latency is the difference of the medians.
Restart: a gateway caches RESTART_KEYS lists, gets SIGTERM and starts again: the time until its
first answer, and the box requests while every key is read once more, with the disk tier and
without it.

Writes bench/results/fleet.json and the block between <!-- fleet:start --> and
<!-- fleet:end --> in bench/README.md; `--rewrite` regenerates the block from fleet.json.

    python3 bench/fleet.py [--rewrite]
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# One free-port helper for every bench script, and the binaries bench/run.sh measures (the
# gateway build and the probe, each overridable as bench.py says).
from bench import ACCOUNT, BIN, PROBE, RESULTS, ROOT, free_port  # noqa: E402
from bench import ID_TEMPLATE as TEMPLATE  # noqa: E402
SECRET = "fleet-secret-2b7d"
FIRST = 1_000_000
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
STORM = 300
STORM_DELAY_MS = 300
SHARED_KEYS = 2_000
RESTART_KEYS = 10_000


def log(message):
    print(f"[fleet] {message}", flush=True)


def get(url, method="GET"):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_up(url, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"{url} did not come up")


def gateway_config(work, name, sim, secret_file, cache, account):
    """Write a gateway's configuration in front of the simulated box at `sim` (loopback, free
    ports, `ttl` 10 minutes, `cache` and `account` lines added); its path and ports."""
    public, admin = free_port(), free_port()
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f"""
[server]
listen = "127.0.0.1:{public}"
[admin]
listen = "127.0.0.1:{admin}"
[cache]
ttl = "10m"
{cache}
[accounts.{ACCOUNT}]
base_url = "{sim}"
shared_secret_file = "{secret_file}"
{account}
""")
    return path, public, admin


def probe(*args):
    out = subprocess.run([PROBE, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


class Fixture:
    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="miralix-fleet-")
        self.processes = []
        secret = os.path.join(self.work, "secret")
        with open(secret, "w") as f:
            f.write(SECRET)
        self.secret_file = secret
        self.sim_port = free_port()
        self.sim = f"http://127.0.0.1:{self.sim_port}"
        self.spawn([BIN, "simulate", "--plain", "--listen", f"127.0.0.1:{self.sim_port}",
                    "--secret-file", secret, "--synthetic-agents", "100000"])
        wait_up(f"{self.sim}/_simulator/stats")

    def spawn(self, cmd, env=None):
        process = subprocess.Popen(cmd, cwd=self.work, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=env)
        self.processes.append(process)
        return process

    def box_requests(self):
        return json.loads(get(f"{self.sim}/_simulator/stats")[1])["requests"]

    def redis(self):
        port = free_port()
        self.spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", self.work])
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(7) == b"+PONG\r\n":
                        return f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    def gateway(self, name, tier):
        path, public, admin = gateway_config(self.work, name, self.sim, self.secret_file,
                                             f'max_bytes = "1GiB"\n{tier}',
                                             "max_concurrent_requests = 64")
        env = dict(os.environ, RUST_LOG="warn")
        process = self.spawn([BIN, "serve", "--config", path], env=env)
        return process, f"http://127.0.0.1:{public}", f"http://127.0.0.1:{admin}"

    def close(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def fleet(fx):
    url = fx.redis()
    shared = f'[cache.shared]\nurl = "{url}"'
    gateways = [fx.gateway(f"fleet-{n}", shared) for n in range(3)]
    for _, _, admin in gateways:
        wait_up(f"{admin}/readyz")
    bases = [base for _, base, _ in gateways]
    get(f"{fx.sim}/_simulator/delay?ms={STORM_DELAY_MS}", method="PUT")
    storms = []
    for round_ in range(ROUNDS):
        agent = FIRST + 90_000 + round_
        before = fx.box_requests()
        target = TEMPLATE.replace("{n}", str(agent))
        spread = [arg for base in bases[1:] for arg in ("--spread", base + target)]
        outcome = probe("storm", bases[0] + target, str(STORM), *spread)
        outcome["box_requests"] = fx.box_requests() - before
        storms.append(outcome)
        log(f"storm round {round_ + 1}: {outcome}")
    get(f"{fx.sim}/_simulator/delay?ms=0", method="PUT")
    hits = []
    for round_ in range(ROUNDS):
        first = FIRST + 10_000 * (round_ + 1)
        args = (TEMPLATE, str(first), str(SHARED_KEYS))
        probe("sequence", bases[0], *args)
        shared_hit = probe("sequence", bases[1], *args)
        memory_hit = probe("sequence", bases[1], *args)
        hits.append({"shared": shared_hit, "memory": memory_hit})
        log(f"hits round {round_ + 1}: shared {shared_hit} memory {memory_hit}")
    return {"storm": storms, "hits": hits}


def restart(fx, tier_name, tier):
    process, base, admin = fx.gateway(f"restart-{tier_name}", tier)
    wait_up(f"{admin}/readyz")
    first = FIRST + (50_000 if tier_name == "disk" else 70_000)
    fill = probe("sequence", base, TEMPLATE, str(first), str(RESTART_KEYS), "--parallel", "8")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    started = time.monotonic()
    process, base, admin = fx.gateway(f"restart-{tier_name}-again", tier)
    target = base + TEMPLATE.replace("{n}", str(first))
    while True:
        try:
            if get(target)[0] == 200:
                break
        except OSError:
            time.sleep(0.005)
    first_answer = time.monotonic() - started
    before = fx.box_requests()
    reread = probe("sequence", base, TEMPLATE, str(first), str(RESTART_KEYS), "--parallel", "8")
    after = time.monotonic() - started
    outcome = {"fill": fill, "first_answer_s": first_answer, "reread": reread,
               "box_requests": fx.box_requests() - before, "reread_done_s": after}
    process.terminate()
    process.wait(timeout=60)
    log(f"restart {tier_name}: {outcome}")
    return outcome


def run():
    fx = Fixture()
    try:
        results = {"date": time.strftime("%Y-%m-%d"),
                   "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip(),
                   "fleet": fleet(fx)}
        disk = f'[cache.disk]\npath = "{fx.work}/cache.redb"\nmax_bytes = "1GiB"'
        results["restart"] = {"disk": restart(fx, "disk", disk), "memory": restart(fx, "memory", "")}
    finally:
        fx.close()
    return results


def spread(values, unit, digits=2):
    values = sorted(values)
    median = statistics.median(values)
    return f"{median:.{digits}f} {unit} (rounds {values[0]:.{digits}f} to {values[-1]:.{digits}f})"


def block(r):
    f = r["fleet"]
    storms = f["storm"]
    box = sorted({s["box_requests"] for s in storms})
    added = [h["shared"]["p50_ms"] - h["memory"]["p50_ms"] for h in f["hits"]]
    disk, memory = r["restart"]["disk"], r["restart"]["memory"]
    rows = [
        "| row | figure |",
        "|---|---|",
        f"| fleet cold storm: box requests ({STORM} clients over 3 instances, box answers after "
        f"{STORM_DELAY_MS} ms) | {', '.join(str(s['box_requests']) for s in storms)} (one per round) |",
        f"| fleet cold storm: client p50 | {spread([s['p50_ms'] for s in storms], 'ms', 1)} |",
        f"| fleet cold storm: client p99 | {spread([s['p99_ms'] for s in storms], 'ms', 1)} |",
        f"| shared-tier hit p50 ({SHARED_KEYS} keys) | {spread([h['shared']['p50_ms'] for h in f['hits']], 'ms', 3)} |",
        f"| memory hit p50 (the same keys) | {spread([h['memory']['p50_ms'] for h in f['hits']], 'ms', 3)} |",
        f"| added by the shared tier | {spread(added, 'ms', 3)} |",
        f"| restart with {RESTART_KEYS:,} cached lists, disk tier: first answer after | {disk['first_answer_s']:.2f} s |",
        f"| the same: box requests while every key is read again | {disk['box_requests']:,} |",
        f"| restart without a second tier: first answer after | {memory['first_answer_s']:.2f} s |",
        f"| the same: box requests while every key is read again | {memory['box_requests']:,} |",
    ]
    prose = (
        f"Measured on {r['date']} at {r['commit']}, one run of {len(storms)} rounds, on this "
        f"machine (servers not pinned). A cold storm of {STORM} clients spread over three "
        f"gateways sharing one Redis cost the box {'/'.join(str(b) for b in box)} request(s) per "
        f"round; its clients waited {spread([s['p50_ms'] for s in storms], 'ms', 1)} at the "
        f"median. A first read on an instance that finds the entry in Redis took "
        f"{spread(added, 'ms', 3)} more than a memory hit at the median. After a SIGTERM and "
        f"a restart with {RESTART_KEYS:,} cached lists, the disk tier answered the first "
        f"request {disk['first_answer_s']:.2f} s after the start and the box got "
        f"{disk['box_requests']:,} requests while every key was read again; without a second "
        f"tier, the box got {memory['box_requests']:,}."
    )
    return "\n".join(rows) + "\n\n" + prose + "\n"


def write_results(name, results, text, heading=None):
    """Keep `results` in bench/results/<name>.json and put `text` between the README's
    <!-- name:start --> and <!-- name:end --> marks (added under `heading` if missing)."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    readme = os.path.join(ROOT, "bench", "README.md")
    with open(readme) as f:
        content = f.read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in content and heading:
        content += f"\n{heading}\n\n{start}\n{end}\n"
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(before + start + "\n" + text + end + after)


def write(r):
    write_results("fleet", r, block(r))


def main():
    if sys.argv[1:] == ["--rewrite"]:
        with open(os.path.join(RESULTS, "fleet.json")) as f:
            return write(json.load(f))
    write(run())


if __name__ == "__main__":
    main()
