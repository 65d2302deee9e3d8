#!/usr/bin/env python3
"""A/B of gateway builds, in the benchmark's layout, for the rows of bench/README.md's "What was
tried" table.

    python3 bench/ab.py hits [--tls] [--rates 22700,45500] [--rounds 6] LABEL=BINARY ...
    python3 bench/ab.py hits --close [--tls] [--rounds 6] LABEL=BINARY ...
    python3 bench/ab.py misses [--rounds 4] [--count 500] LABEL=BINARY ...
    python3 bench/ab.py instructions [--rounds 3] [--count 5000] [--new-connections] LABEL=BINARY ...
    python3 bench/ab.py describe RESULTS.json [LABEL=TEXT ...]

Each LABEL=BINARY is a gateway build (for instance `base=/tmp/base new=target/release/miralix-gateway`);
nginx proxy_cache from bench/nginx.conf runs beside them as the reference. The servers are pinned
to CPU 0, the simulated box and the probe to CPU 1, as in bench/run.sh, and every round visits the
servers in a rotated order, so that the host's drift falls on all of them.

- `hits`: open-loop plain (or TLS) hits of the benchmark's 14 KB list at each rate, 64 keep-alive
  connections, 5 s per run: each server's CPU per request (and the kernel's part of it) and p99.
  With --close, each hit on a connection of its own instead (`wrk -t1 -c64` with `Connection:
  close`, as bench/run.sh's scenario, BENCH_CLOSE_DURATION per run): what a client that does
  not keep connections alive costs each server, in CPU per request.
- `misses`: sequential misses on distinct agents, each a 200 list: p50 per round, and its overhead
  over a direct request to the box from the probe's core and from the servers' core.
- `instructions`: each server (nginx's worker too) under valgrind's callgrind, one at a time,
  `--count` plain hits per round at COUNTED_RATE on 8 connections (a wake-up for each request,
  as at a low load): the user-space instructions executed per hit, counters zeroed before and
  dumped after each round. It counts work, not time, and repeats to within a fraction of a
  percent, so it can judge a change of a few percent in the hit path's own code that timed
  rounds on a noisy host cannot. It says nothing of the kernel's part. Needs `valgrind`
  (Debian's package). With --new-connections, each round is `--count` clients at once (default
  200), each on a new connection with one hit: what a client that does not keep connections
  alive costs. --keep DIR keeps each round's dump there (`callgrind_annotate DIR/LABEL.N`), for
  the profile behind a change.

Every figure is printed as the median of the rounds with the min to max range, and the raw rounds
are written as JSON with --json. --cache LABEL='gzip = false' adds [cache] lines to one build's
configuration. --perf LABEL runs only that server's rounds, under `perf record -e cpu-clock -g`
(written to --perf-out), for the profile behind a change.

`describe` prints what a --json file measured as one sentence, the "measured" cell of a row in
results/history.json (each build named by its TEXT, or by its label), so that the row's figures
come from the rounds rather than being typed.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402  (the benchmark's own helpers, so both measure alike)
    DEFAULT_CACHE, FIRST_SYNTHETIC, HIT_PATH, ID_TEMPLATE, LOAD_CPU, SECRET, SERVER_CPU, Server,
    describe_ab, equal_load, fetch, free_port, make_front_certificate, probe, render_nginx_conf,
    rotated, spread, start_box, wait_until_up, wrk, write_gateway_config)

# Agents the simulated box makes up lists for, from FIRST_SYNTHETIC on: enough for every miss.
SYNTHETIC_AGENTS = 1_000_000
# Requests/s of the instructions scenario: slow enough that each hit has a wake-up of its own.
COUNTED_RATE = 500


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["hits", "misses", "instructions"])
    parser.add_argument("builds", nargs="+", metavar="LABEL=BINARY")
    parser.add_argument("--rates", default="22700,45500,68200",
                        help="hits: offered requests/s, comma-separated")
    parser.add_argument("--tls", action="store_true", help="hits over TLS instead of plain HTTP")
    parser.add_argument("--close", action="store_true",
                        help="hits: each on a new connection (wrk, Connection: close)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--count", type=int, default=None,
                        help="misses (default 500) or hits (instructions: 5000) per round")
    parser.add_argument("--no-nginx", action="store_true", help="gateway builds only")
    parser.add_argument("--new-connections", action="store_true",
                        help="instructions: one hit per new connection")
    parser.add_argument("--cache", action="append", default=[], metavar="LABEL=LINES",
                        help="extra [cache] lines for one build, ';' between lines")
    parser.add_argument("--perf", metavar="LABEL", help="profile this server alone")
    parser.add_argument("--perf-out", default="/tmp/miralix-ab.perf.data")
    parser.add_argument("--json", metavar="PATH", help="write the raw rounds here")
    parser.add_argument("--keep", metavar="DIR",
                        help="instructions: keep each round's callgrind dump in DIR")
    args = parser.parse_args()
    builds = {}
    for build in args.builds:
        label, _, binary = build.partition("=")
        if not label or not os.access(binary, os.X_OK) or label == "nginx":
            parser.error(f"{build}: expected LABEL=BINARY (an executable gateway build; "
                         f"the label nginx is taken)")
        builds[label] = os.path.abspath(binary)
    extra = {}
    for lines in args.cache:
        label, _, text = lines.partition("=")
        if label not in builds:
            parser.error(f"--cache {lines}: {label} is not one of {', '.join(builds)}")
        extra[label] = text.replace(";", "\n")
    if args.perf and args.perf not in list(builds) + ["nginx"]:
        parser.error(f"--perf {args.perf}: not one of {', '.join(builds)} or nginx")
    if args.keep and args.scenario != "instructions":
        parser.error("--keep: only the instructions scenario writes callgrind dumps")
    if args.count is None:
        args.count = {"instructions": 200 if args.new_connections else 5000}.get(args.scenario,
                                                                                 500)
    if args.scenario == "instructions":
        if args.perf or args.tls:
            parser.error("instructions: counts plain hits of the gateway builds, without --perf "
                         "or --tls")
        for tool in ["valgrind", "callgrind_control"]:
            if not shutil.which(tool):
                parser.error(f"instructions: {tool} not found (apt-get install valgrind)")
    return args, builds, extra


def start(work, builds, extra, with_nginx, servers, wrap=lambda label: ()):
    """The box, nginx and every build (each run under `wrap`, a command prefix); per server its
    Server and its base URLs."""
    secret_file = os.path.join(work, "secret")
    with open(secret_file, "w") as f:
        f.write(SECRET)
    make_front_certificate(work)
    ports = {name: free_port() for name in ["sim", "nginx_plain", "nginx_tls", "static"]}
    box = start_box(work, ports["sim"], secret_file, servers, SYNTHETIC_AGENTS)
    found = {}
    if with_nginx:
        conf = render_nginx_conf(work, ports)
        command = ["nginx", "-p", work, "-c", conf]
        if wrap("nginx"):
            # valgrind's control pipes belong to the user who started nginx; a worker that
            # switched to `nobody` could not be reached through them.
            command += ["-g", "user root;"]
        nginx = Server("nginx", [*wrap("nginx"), *command], work)
        servers.append(nginx)
        found["nginx"] = (nginx, f"http://127.0.0.1:{ports['nginx_plain']}",
                          f"https://127.0.0.1:{ports['nginx_tls']}")
        wait_until_up(found["nginx"][1] + "/", what="nginx", server=nginx)
    env = dict(os.environ, RUST_LOG="warn")
    for label, binary in builds.items():
        listen = (free_port(), free_port(), free_port())
        config = write_gateway_config(work, label, listen, (*box, secret_file),
                                      DEFAULT_CACHE + "\n" + extra.get(label, ""))
        server = Server(label, [*wrap(label), binary, "serve", "--config", config], work,
                        env=env)
        servers.append(server)
        wait_until_up(f"http://127.0.0.1:{listen[2]}/readyz", what=label, server=server)
        found[label] = (server, f"http://127.0.0.1:{listen[0]}", f"https://127.0.0.1:{listen[1]}")
    return box, found


def hits(args, found, work, profile):
    ca = os.path.join(work, "front.crt")
    urls = {name: (tls if args.tls else plain) + HIT_PATH for name, (_, plain, tls) in found.items()}
    for name, url in urls.items():
        for _ in range(2):  # the first request fills each cache
            status, _, _ = fetch(url, ca)
        if status != 200:
            sys.exit(f"{name}: {url} answered {status}")
    if args.close:
        return closing_hits(args, found, urls, profile)
    rates = [int(rate) for rate in args.rates.split(",")]
    runs = {rate: {name: [] for name in urls} for rate in rates}
    for rate in rates:
        for round_ in range(args.rounds):
            for name in rotated(list(urls), round_):
                if profile and name != profile:
                    continue
                outcome = equal_load(urls[name], found[name][0], rate, ca if args.tls else None)
                runs[rate][name].append(outcome)
        if profile:
            continue
        print(f"{rate:,} {'TLS' if args.tls else 'plain'} requests/s, {args.rounds} rounds: "
              f"CPU per request us (kernel us), p99 ms, median (min to max)")
        for name, outcomes in runs[rate].items():
            cpu = [o["server_us_per_request"] for o in outcomes]
            kernel = [o["server_kernel_us_per_request"] for o in outcomes]
            p99 = [o["p99_ms"] for o in outcomes]
            ratio = ""
            if "nginx" in runs[rate] and name != "nginx":
                nginx = statistics.median(o["server_us_per_request"] for o in runs[rate]["nginx"])
                ratio = f"  nginx / {name} {nginx / statistics.median(cpu):.3f}x"
            print(f"  {name:>10}: {spread(cpu)} ({spread(kernel)}), p99 {spread(p99, 3)}{ratio}")
    return {str(rate): by_server for rate, by_server in runs.items()}


def closing_hits(args, found, urls, profile):
    """Saturated wrk runs in which every hit opens a connection of its own, rotating rounds:
    per server, its CPU per request (and the kernel's part), requests/s and p99."""
    runs = {name: [] for name in urls}
    for round_ in range(args.rounds):
        for name in rotated(list(urls), round_):
            if profile and name != profile:
                continue
            runs[name].append(wrk(urls[name], found[name][0], close=True))
    if not profile:
        print(f"a new connection per {'TLS' if args.tls else 'plain'} hit, {args.rounds} rounds: "
              f"CPU per request us (kernel us), requests/s, p99 ms, median (min to max)")
        nginx = (statistics.median(o["server_us_per_request"] for o in runs["nginx"])
                 if "nginx" in runs else None)
        for name, outcomes in runs.items():
            cpu = [o["server_us_per_request"] for o in outcomes]
            kernel = [o["server_kernel_us_per_request"] for o in outcomes]
            ratio = (f"  nginx / {name} {nginx / statistics.median(cpu):.3f}x"
                     if nginx and name != "nginx" else "")
            print(f"  {name:>10}: {spread(cpu)} ({spread(kernel)}), "
                  f"{spread([o['rps'] for o in outcomes], 0)}/s, "
                  f"p99 {spread([o['p99_ms'] for o in outcomes], 3)}{ratio}")
    return {"close": runs}


def misses(args, found, box, profile):
    sim_url, sim_ca = box
    direct = ["--ca", sim_ca, "--header", f"X-Miralix-Shared-Secret: {SECRET}"]
    # The direct requests from the probe's core and from the servers' core (the way the proxies'
    # own requests to the box travel), then each server from the probe's core.
    sources = {"direct": (sim_url, direct, LOAD_CPU), "direct_cross": (sim_url, direct, SERVER_CPU)}
    sources.update({name: (plain, [], LOAD_CPU) for name, (_, plain, _) in found.items()})
    next_id = FIRST_SYNTHETIC
    for name, (base, extra, cpu) in sources.items():  # connections and pools warmed
        probe(*extra, "sequence", base, ID_TEMPLATE, str(next_id), "50", cpu=cpu)
        next_id += 50
    runs = {name: [] for name in sources}
    for round_ in range(args.rounds):
        for name in rotated(list(sources), round_):
            if profile and name != profile:
                continue
            base, extra, cpu = sources[name]
            server = found[name][0] if name in found else None
            before = server.cpu_split() if server else None
            outcome = probe(*extra, "sequence", base, ID_TEMPLATE, str(next_id), str(args.count),
                            cpu=cpu)
            if server:  # the whole process's CPU, its background threads included
                after = server.cpu_split()
                outcome["server_us_per_miss"] = (sum(after) - sum(before)) / args.count * 1e6
                outcome["kernel_us_per_miss"] = (after[1] - before[1]) / args.count * 1e6
            if outcome["statuses"] != {"200": args.count}:
                sys.exit(f"misses against {name} were not all 200s: {outcome['statuses']}")
            runs[name].append(outcome)
            next_id += args.count
    if not profile:
        direct_p50 = [o["p50_ms"] for o in runs["direct"]]
        print(f"{args.count} sequential misses per round, {args.rounds} rounds: p50 ms and its "
              f"overhead over the direct request of the same round, median (min to max)")
        for name, outcomes in runs.items():
            p50 = [o["p50_ms"] for o in outcomes]
            overhead = [o - d for o, d in zip(p50, direct_p50)]
            used = ""
            if "server_us_per_miss" in outcomes[0]:
                used = (f", CPU per miss {spread([o['server_us_per_miss'] for o in outcomes])} us"
                        f" ({spread([o['kernel_us_per_miss'] for o in outcomes])} in the kernel)")
            print(f"  {name:>12}: p50 {spread(p50, 3)}, overhead {spread(overhead, 3)}{used}")
    return runs


def callgrind(work):
    """The command prefix that runs a server under callgrind (nginx's worker too), its profiles
    written in `work`."""
    return lambda label: ["valgrind", "--tool=callgrind", "--quiet", "--trace-children=yes",
                          f"--callgrind-out-file={os.path.join(work, label)}.callgrind.%p"]


def instructions(args, found, work):
    """Per server (each build, and nginx's worker), the instructions callgrind counted per
    plain hit, round by round."""
    runs = {}
    for name, (server, plain, _) in found.items():
        url = plain + HIT_PATH
        for _ in range(2):  # the first request fills the cache
            status, _, _ = fetch(url)
        if status != 200:
            sys.exit(f"{name}: {url} answered {status}")
        pid = str(server.cpu_pid())
        # Warmed: connections, pools and the cache's bookkeeping, outside the counted rounds.
        probe("rate", url, str(COUNTED_RATE), "1", "--connections", "8")
        runs[name] = []
        for _ in range(args.rounds):
            subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True)
            if args.new_connections:
                outcome = probe("storm", url, str(args.count))
            else:
                outcome = probe("rate", url, str(COUNTED_RATE), str(args.count / COUNTED_RATE),
                                "--connections", "8")
            before = set(os.listdir(work))
            subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
            if outcome["statuses"] != {"200": args.count}:
                sys.exit(f"{name}: hits were not all 200s: {outcome['statuses']}")
            # This process's dump (`LABEL.callgrind.PID.N`): nginx starts helpers of its own.
            dump = next(f for f in set(os.listdir(work)) - before
                        if f.startswith(f"{name}.callgrind.{pid}."))
            with open(os.path.join(work, dump)) as f:
                total = next(int(line.split()[1]) for line in f
                             if line.startswith(("summary:", "totals:")))
            outcome["instructions_per_request"] = round(total / outcome["n"])
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                shutil.copy(os.path.join(work, dump),
                            os.path.join(args.keep, f"{name}.{len(runs[name]) + 1}"))
            runs[name].append(outcome)
    each = (f"{args.count} new connections at once per round, one plain hit on each"
            if args.new_connections else f"{args.count} plain hits per round at {COUNTED_RATE}/s")
    print(f"{each}, {args.rounds} rounds: user-space instructions per "
          f"{'connection' if args.new_connections else 'hit'}, median (min to max)")
    for name, outcomes in runs.items():
        print(f"  {name:>10}: {spread([o['instructions_per_request'] for o in outcomes], 0)}")
    return runs


def main():
    if sys.argv[1:2] == ["describe"]:
        if len(sys.argv) < 3 or not all("=" in name for name in sys.argv[3:]):
            sys.exit("usage: ab.py describe RESULTS.json [LABEL=TEXT ...] (RESULTS.json as "
                     "written by --json)")
        names = dict(name.partition("=")[::2] for name in sys.argv[3:])
        try:
            with open(sys.argv[2]) as f:
                print(describe_ab(json.load(f), names))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            sys.exit(f"ab.py describe: {sys.argv[2]} is not the rounds ab.py --json wrote "
                     f"({error.__class__.__name__}: {error})")
        return
    args, builds, extra = arguments()
    work = tempfile.mkdtemp(prefix="miralix-ab-")
    servers, recorder = [], None
    try:
        counted = args.scenario == "instructions"
        box, found = start(work, builds, extra, not args.no_nginx, servers,
                           callgrind(work) if counted else lambda label: ())
        if args.perf:
            pid = found[args.perf][0].cpu_pid()
            recorder = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-g",
                                         "-p", str(pid), "-o", args.perf_out])
        if args.scenario == "hits":
            runs = hits(args, found, work, args.perf)
        elif counted:
            runs = instructions(args, found, work)
        else:
            runs = misses(args, found, box, args.perf)
        if recorder:
            recorder.send_signal(2)
            recorder.wait()
            print(f"profile of {args.perf}: {args.perf_out} (perf report -i {args.perf_out})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"scenario": args.scenario, "tls": args.tls, "close": args.close,
                           "new_connections": args.new_connections, "builds": builds,
                           "cache": extra, "runs": runs}, f, indent=1)
    finally:
        if recorder and recorder.poll() is None:
            recorder.kill()
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
