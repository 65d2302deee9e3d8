#!/usr/bin/env python3
"""SIGTERM under keep-alive load: how many requests in flight at the moment of shutdown go
unanswered.

Starts the simulated box and a gateway (release build, plain HTTP), warms one key, drives it
with `wrk -c<connections>` and sends the gateway SIGTERM in the middle of the run, then prints
wrk's socket errors. A request wrk had sent when the gateway stopped either gets its answer
(with `Connection: close`) or counts as a read error: read errors are the unanswered requests.
wrk then keeps reconnecting to the closed listener until its run ends; it counts each refused
attempt as a write (or connect) error, which is what a stopped server should cause.

    python3 bench/shutdown.py [--binary PATH] [--runs N] [--connections N]
"""

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCOUNT = "greenbox"
SECRET = "shutdown-secret-5d1e"
PATH = f"/mot/{ACCOUNT}/agents/id/103/recordings"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return reply.read()
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"no answer from {url}")


def one_run(binary, connections, workdir):
    box_port, public, admin = free_port(), free_port(), free_port()
    secret_file = os.path.join(workdir, "secret")
    with open(secret_file, "w") as f:
        f.write(SECRET)
    box = subprocess.Popen(
        [binary, "simulate", "--plain", "--listen", f"127.0.0.1:{box_port}",
         "--secret-file", secret_file],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = os.path.join(workdir, "gateway.toml")
    with open(config, "w") as f:
        f.write(f"""
[server]
listen = "127.0.0.1:{public}"
shutdown_grace = "5s"
[admin]
listen = "127.0.0.1:{admin}"
[cache]
ttl = "10m"
[accounts.{ACCOUNT}]
base_url = "http://127.0.0.1:{box_port}"
shared_secret = "{SECRET}"
""")
    gateway = subprocess.Popen([binary, "serve", "--config", config],
                               env={**os.environ, "RUST_LOG": "warn"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{public}{PATH}")
        wrk = subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", "-d4s", f"http://127.0.0.1:{public}{PATH}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2)
        gateway.send_signal(signal.SIGTERM)
        out, _ = wrk.communicate(timeout=30)
        code = gateway.wait(timeout=30)
    finally:
        for process in (gateway, box):
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = dict(connect=0, read=0, write=0, timeout=0)
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if match:
        errors = dict(zip(errors, map(int, match.groups())))
    requests = re.search(r"(\d+) requests in", out)
    return dict(errors, requests=int(requests.group(1)) if requests else 0, exit=code)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/miralix-gateway"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in range(args.runs):
            result = one_run(args.binary, args.connections, workdir)
            runs.append(result)
            refused = result["write"] + result["connect"]
            print(f"run {n + 1}: unanswered (read errors) {result['read']}, "
                  f"reconnects refused {refused}, {result['requests']} requests, "
                  f"gateway exit {result['exit']}", flush=True)
    reads = [r["read"] for r in runs]
    print(f"unanswered requests per shutdown ({args.connections} connections, {args.runs} runs): "
          f"median {statistics.median(reads)}, min {min(reads)}, max {max(reads)}")


if __name__ == "__main__":
    sys.exit(main())
