#!/usr/bin/env python3
"""Profile-guided release build of the gateway: the binary bench/run.sh measures, and the one to
install.

    python3 bench/pgo.py                  # writes target/pgo/release/miralix-gateway
    python3 bench/pgo.py --check          # exit 0 if this machine can, else say what is missing
    python3 bench/pgo.py --train BINARY   # the training mix alone, shortened, against BINARY

Three steps, in target/pgo (the plain `cargo build --release` in target/release is left alone):

1. build the gateway instrumented (`-Cprofile-generate`);
2. train it: the simulated box and the instrumented gateway (plain and TLS listeners) on
   loopback, with the load probe sending the traffic a gateway sees in production, mostly hits:
   misses that fill the cache, hits plain and over TLS, gzip, `304`s, `fromQueueCallId`
   selections, `404`s, the directory, a queue, a passthrough read, recordings' audio through
   the audio store (downloads, then reads from disk, whole and ranges), the admin listener's
   status page, metrics and cache listing, HTTP/2 when `curl` is there, hits and misses on a
   second gateway whose account takes API keys (a wrong key's `401` too), and on a third that
   asks TLS clients for certificates (mutual TLS, through `curl` with a client certificate);
3. merge the profile with `llvm-profdata` and build again with `-Cprofile-use`.

`llvm-profdata` must come from the LLVM that rustc is built on (`rustc -vV`): on Debian
`apt-get install llvm-NN` (NN its major version), or `rustup component add llvm-tools`. The
environment variable LLVM_PROFDATA names one explicitly. Like the benchmark, the training pins
the gateway and the box to different CPUs with taskset: it needs two.

`--train` is what CI runs (with the debug build and BENCH_PROBE pointing at the debug probe): every
request of the mix must get the answer it expects, so a route that changes shape fails there
rather than in the middle of a release build.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402  (the benchmark's own helpers: the same box and configuration)
    ACCOUNT, ADMIN_TOKEN, AUDIO_TEMPLATE, DEFAULT_CACHE, FIRST_SYNTHETIC, HIT_PATH, ID_TEMPLATE,
    PROBE, ROOT, SECRET, Server, fetch, free_port, make_front_certificate, probe, start_box,
    wait_until_up, write_gateway_config)

TARGET = os.path.join(ROOT, "target", "pgo")
OUTPUT = os.path.join(TARGET, "release", "miralix-gateway")


def log(message):
    print(f"[pgo] {message}", flush=True)


def llvm_major():
    version = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"^LLVM version: (\d+)\.", version, re.MULTILINE)
    if not found:
        sys.exit("[pgo] rustc -vV names no LLVM version")
    return found.group(1)


def find_profdata(major):
    """An llvm-profdata of rustc's LLVM major version, or None and why not."""
    candidates = []
    if os.environ.get("LLVM_PROFDATA"):
        candidates.append(os.environ["LLVM_PROFDATA"])
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True,
                             text=True).stdout.strip()
    candidates += glob.glob(os.path.join(sysroot, "lib", "rustlib", "*", "bin", "llvm-profdata"))
    candidates += [shutil.which(f"llvm-profdata-{major}") or "",
                   f"/usr/lib/llvm-{major}/bin/llvm-profdata", shutil.which("llvm-profdata") or ""]
    seen, tried = [], set()
    for candidate in filter(None, candidates):
        if not os.access(candidate, os.X_OK) or os.path.realpath(candidate) in tried:
            continue
        tried.add(os.path.realpath(candidate))
        # `merge --version`: older releases have no top-level --version.
        out = subprocess.run([candidate, "merge", "--version"], capture_output=True,
                             text=True).stdout
        version = re.search(r"LLVM version (\d+)\.", out)
        if version and version.group(1) == major:
            return candidate, None
        seen.append(f"{candidate} (LLVM {version.group(1) if version else '?'})")
    why = f"no llvm-profdata for LLVM {major}, the LLVM of this rustc"
    if seen:
        why += f"; found only {', '.join(seen)}"
    return None, why + (f". Install it: apt-get install llvm-{major}, or rustup component add "
                        "llvm-tools, or set LLVM_PROFDATA")


def cargo_build(rustflags, what):
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET,
               RUSTFLAGS=" ".join(filter(None, [os.environ.get("RUSTFLAGS", ""), rustflags])))
    log(f"building the gateway {what}")
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "miralix-gateway"],
                   cwd=ROOT, env=env, check=True)


def rate(url, per_second, seconds, *extra, expect="200"):
    """Open-loop requests at `per_second`, every one answered with the status `expect`."""
    outcome = probe(*extra, "rate", url, str(per_second), str(seconds), "--connections", "16")
    if set(outcome["statuses"]) != {expect}:
        sys.exit(f"[pgo] training: {url} answered {outcome['statuses']}, not only {expect}s")


def sequence(base, first, count, expect, *extra):
    """`count` requests for distinct agents from `first`, every one answered `expect`."""
    outcome = probe(*extra, "sequence", base, ID_TEMPLATE, str(first), str(count),
                    "--parallel", "4")
    if outcome["statuses"] != {expect: count}:
        sys.exit(f"[pgo] training: agents {first}.. answered {outcome['statuses']}, "
                 f"not {count} {expect}s")


# The keyed gateway's one API key (a throw-away value: the training's gateways live on loopback
# for a minute).
TRAINING_KEY = "pgo-training-key-0123456789"


# The common name of the training's client certificate, the one the mTLS account opens to.
CLIENT_NAME = "pgo-training-client"


def make_client_certificate(work):
    """A CA of the training's own (`clients-ca.crt`) and a client certificate it issued for
    CLIENT_NAME (`client.crt`, `client.key`), in `work`."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=pgo-training-clients-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign", "-keyout", "clients-ca.key",
            "-out", "clients-ca.crt")
    openssl("req", *ec, "-subj", f"/CN={CLIENT_NAME}", "-keyout", "client.key",
            "-out", "client.csr")
    with open(os.path.join(work, "client.ext"), "w") as f:
        f.write(f"basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n"
                f"subjectAltName=DNS:{CLIENT_NAME}\n")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "clients-ca.crt", "-CAkey",
            "clients-ca.key", "-CAcreateserial", "-days", "2", "-extfile", "client.ext",
            "-out", "client.crt")


def curl(options, urls):
    """curl with `options` over `urls` (one connection), every answer a success."""
    done = subprocess.run(["curl", "-s", "--fail", *options, *urls], stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        sys.exit(f"[pgo] training: curl {' '.join(options)} failed (exit {done.returncode}) "
                 f"on {urls[0]}")


def audio(plain, listed, scale):
    """Recordings of the agent's list replayed through the audio store: each downloaded once,
    then read from disk, whole and in ranges."""
    ids = [str(element["QueueCallId"]) for element in listed[:8]]
    id_args = [arg for n in ids for arg in ("--id", n)]
    for extra, expect in [([], "200"), (["--header", "Range: bytes=1048576-1114111"], "206")]:
        outcome = probe(*extra, "replay", plain, AUDIO_TEMPLATE, "4", str(max(0.2, 2 * scale)),
                        *id_args)
        if set(outcome["statuses"]) != {expect}:
            sys.exit(f"[pgo] training: recordings answered {outcome['statuses']}, "
                     f"not only {expect}s")


def train(binary, work, scale=1.0):
    """The production mix against `binary`; an instrumented one writes its profile into
    `work`/profiles when it exits. `scale` shortens every part of the mix."""
    secret_file = os.path.join(work, "secret")
    with open(secret_file, "w") as f:
        f.write(SECRET)
    make_front_certificate(work)
    # Each process writes its own file; %m keeps runs of another binary apart.
    env = dict(os.environ, RUST_LOG="warn",
               LLVM_PROFILE_FILE=os.path.join(work, "profiles", "%m-%p.profraw"))
    servers = []
    try:
        box = start_box(work, free_port(), secret_file, servers, binary=binary, env=env)

        def gateway(name, lines, tls=""):
            """A gateway in front of the box, `lines` appended to its configuration (whose
            last table is the account's), `tls` added to [server.tls]; its plain, TLS and
            admin URLs."""
            ports = (free_port(), free_port(), free_port())
            config = write_gateway_config(work, name, ports, (*box, secret_file), DEFAULT_CACHE,
                                          tls_lines=tls)
            with open(config, "a") as f:
                f.write(lines)
            server = Server(name, [binary, "serve", "--config", config], work, env=env)
            servers.append(server)
            wait_until_up(f"http://127.0.0.1:{ports[2]}/readyz", what=name, server=server)
            return (f"http://127.0.0.1:{ports[0]}", f"https://127.0.0.1:{ports[1]}",
                    f"http://127.0.0.1:{ports[2]}")

        # The audio store and an allowlisted read, as deployed.
        plain, tls, admin = gateway(
            "gateway", f'[cache.audio]\npath = "{work}/audio"\nmax_bytes = "256MiB"\n'
                       f'[[accounts.{ACCOUNT}.passthrough]]\npath = "/queues/{{queueId:int}}"\n'
                       f'ttl = "5m"\n')
        front = ["--ca", os.path.join(work, "front.crt")]

        log("training: misses (plain and TLS), then hits of every kind")

        def count(n):
            return max(1, int(n * scale))

        sequence(plain, FIRST_SYNTHETIC, count(2000), "200")
        sequence(tls, FIRST_SYNTHETIC + 2000, count(500), "200", *front)
        # Agents the box does not know: 404s, cached for negative_ttl.
        sequence(plain, 900_000_000, count(300), "404")
        status, headers, listed = fetch(plain + HIT_PATH)
        etag = {k.lower(): v for k, v in headers.items()}.get("etag")
        if status != 200 or not etag:
            sys.exit(f"[pgo] training: {HIT_PATH} answered {status} without an ETag")
        account = plain + HIT_PATH.split("/agents/")[0]
        rate(plain + HIT_PATH, 5000, 4 * scale)
        rate(tls + HIT_PATH, 3000, 4 * scale, *front)
        rate(plain + HIT_PATH, 2000, 2 * scale, "--header", "Accept-Encoding: gzip")
        rate(tls + HIT_PATH, 1000, 2 * scale, *front, "--header", "Accept-Encoding: gzip")
        rate(plain + HIT_PATH, 1000, 2 * scale, "--header", f"If-None-Match: {etag}",
             expect="304")
        rate(plain + HIT_PATH + "?fromQueueCallId=1", 1000, 2 * scale)
        rate(account + "/agents", 500, 1 * scale)
        rate(account + "/queues/1/calls/recordings", 500, 1 * scale)
        rate(account + "/queues/1", 500, 1 * scale)  # the passthrough table's read
        audio(plain, json.loads(listed), scale)
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for path, headers in [("/metrics", {}), ("/", {}), ("/cache", bearer),
                              (f"/cache/{ACCOUNT}?limit=100", bearer)] * count(20):
            status, _, _ = fetch(admin + path, headers=headers)
            if status != 200:
                sys.exit(f"[pgo] training: {path} on the admin listener answered {status}")
        # Apps read with API keys in production: the key check, and a wrong key's 401.
        keyed, keyed_tls, _ = gateway("keyed", f'api_keys = ["{TRAINING_KEY}"]\n')
        key = ["--header", f"X-Api-Key: {TRAINING_KEY}"]
        sequence(keyed, FIRST_SYNTHETIC + 3000, count(300), "200", *key)
        rate(keyed + HIT_PATH, 3000, 2 * scale, *key)
        rate(keyed_tls + HIT_PATH, 2000, 2 * scale, *front, *key)
        rate(keyed + HIT_PATH, 200, 1 * scale, "--header", "X-Api-Key: not-the-training-key",
             expect="401")
        if not shutil.which("curl"):
            log("no curl: HTTP/2 and client certificates left out of the training")
            return
        curl(["--http2", "--cacert", front[1]], [tls + HIT_PATH] * count(500))
        # Mutual TLS, as a deployment with server.tls.client_ca runs it: a third gateway asks
        # every TLS client for a certificate from a CA of the training's own, and its account
        # names the client.
        make_client_certificate(work)
        _, mtls, _ = gateway("mtls", f'client_names = ["{CLIENT_NAME}"]\n',
                             tls=f'client_ca = "{work}/clients-ca.crt"')
        certified = ["--cacert", front[1], "--cert", os.path.join(work, "client.crt"),
                     "--key", os.path.join(work, "client.key")]
        curl(certified, [mtls + HIT_PATH] * count(300))
        curl(certified, [mtls + ID_TEMPLATE.replace("{n}", str(FIRST_SYNTHETIC + 4000 + n))
                         for n in range(count(100))])
        # Without a certificate the handshake is refused.
        refused = subprocess.run(["curl", "-s", "--cacert", front[1], mtls + HIT_PATH],
                                 stdout=subprocess.DEVNULL)
        if refused.returncode == 0:
            sys.exit("[pgo] training: the mTLS listener answered a client without a certificate")
    finally:
        for server in reversed(servers):
            server.stop()  # SIGTERM: a clean exit is what writes the profile


def main():
    if sys.argv[1:] != ["--check"] and (len(os.sched_getaffinity(0)) < 2
                                        or not shutil.which("taskset")):
        sys.exit("[pgo] the training runs like the benchmark: it needs 2 CPUs and taskset")
    if sys.argv[1:2] == ["--train"] and len(sys.argv) == 3:
        work = tempfile.mkdtemp(prefix="miralix-pgo-train-")
        train(os.path.abspath(sys.argv[2]), work, scale=0.1)
        shutil.rmtree(work, ignore_errors=True)
        log("the training mix ran, every answer as expected")
        return 0
    major = llvm_major()
    profdata, why = find_profdata(major)
    if sys.argv[1:] == ["--check"]:
        print(f"[pgo] {profdata} (LLVM {major})" if profdata else f"[pgo] {why}")
        return 0 if profdata else 1
    if sys.argv[1:]:
        sys.exit(__doc__.split("\n\n")[1])
    if not profdata:
        sys.exit(f"[pgo] {why}")
    if not os.access(PROBE, os.X_OK):
        log("building the load probe")
        subprocess.run(["cargo", "build", "--release", "--locked", "--example", "probe"],
                       cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="miralix-pgo-")
    instrumented = os.path.join(work, "miralix-gateway-instrumented")
    cargo_build(f"-Cprofile-generate={os.path.join(work, 'build-profiles')}", "instrumented")
    # Kept apart from the final build's path, which the next step overwrites.
    shutil.copy2(OUTPUT, instrumented)
    train(instrumented, work)
    profiles = glob.glob(os.path.join(work, "profiles", "*.profraw"))
    if not profiles or not all(os.path.getsize(p) for p in profiles):
        sys.exit(f"[pgo] the instrumented processes wrote no profile (see the logs in {work})")
    merged = os.path.join(TARGET, "miralix-gateway.profdata")
    subprocess.run([profdata, "merge", "-o", merged, *profiles], check=True)
    log(f"merged {len(profiles)} profiles into {merged}")
    cargo_build(f"-Cprofile-use={merged}", "with the profile")
    shutil.rmtree(work, ignore_errors=True)
    log(f"done: {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
