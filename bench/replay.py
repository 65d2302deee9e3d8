#!/usr/bin/env python3
"""The audio store's rows of the benchmark: recordings replayed, with and without [cache.audio].

A QA dashboard replays the same recordings again and again. CLIENTS keep-alive clients ask for
the same RECORDINGS recordings (the simulator's default length) round and round for
SECONDS, through two gateways (release build) in front of one simulated box:
  - pass-through: no [cache.audio], so every replay streams from the box (today's behaviour);
  - store: [cache.audio] in a temporary directory, so a recording comes from the box once.
The rounds alternate between the two, ROUNDS times; the store starts cold, so its first round
includes the downloads. Per round: the box's audio bytes (the simulator's own count) per minute,
the replays answered per second and their p50/p99.
Then RANGE_CLIENTS clients ask for one 64 KiB range of each recording: from the store's files,
and through pass-through (the box answers the range).

Writes bench/results/replay.json and the block between <!-- replay:start --> and
<!-- replay:end --> in bench/README.md; `--rewrite` regenerates the block from replay.json.

    python3 bench/replay.py [--rewrite]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ACCOUNT, spread  # noqa: E402
from bench import AUDIO_TEMPLATE as AUDIO  # noqa: E402
from fleet import (BIN, PROBE, ROOT, RESULTS, free_port, gateway_config, get,  # noqa: E402
                   probe, wait_up, write_results)

SECRET = "replay-secret-5c1e"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CLIENTS = 8
RECORDINGS = 10
SECONDS = 5.0
RANGE_CLIENTS = 4
RANGE_SECONDS = 3.0
RANGE = "bytes=1048576-1114111"


def log(message):
    print(f"[replay] {message}", flush=True)


class Fixture:
    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="miralix-replay-")
        self.processes = []
        self.secret_file = os.path.join(self.work, "secret")
        with open(self.secret_file, "w") as f:
            f.write(SECRET)
        port = free_port()
        self.sim = f"http://127.0.0.1:{port}"
        self.spawn([BIN, "simulate", "--plain", "--listen", f"127.0.0.1:{port}",
                    "--secret-file", self.secret_file])
        wait_up(f"{self.sim}/_simulator/stats")

    def spawn(self, cmd):
        env = dict(os.environ, RUST_LOG="warn")
        process = subprocess.Popen(cmd, cwd=self.work, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=env)
        self.processes.append(process)
        return process

    def stats(self):
        return json.loads(get(f"{self.sim}/_simulator/stats")[1])

    def recordings(self):
        request = urllib.request.Request(
            f"{self.sim}/mot/{ACCOUNT}/agents/id/103/recordings",
            headers={"X-Miralix-Shared-Secret": SECRET})
        with urllib.request.urlopen(request, timeout=10) as response:
            listed = json.loads(response.read())
        return [r["QueueCallId"] for r in listed][:RECORDINGS]

    def gateway(self, name, extra):
        path, public, admin = gateway_config(self.work, name, self.sim, self.secret_file, extra,
                                             "max_audio_streams = 64")
        self.spawn([BIN, "serve", "--config", path])
        wait_up(f"http://127.0.0.1:{admin}/readyz")
        return f"http://127.0.0.1:{public}"

    def close(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def replay(fx, base, ids, clients, seconds, *extra):
    before = fx.stats()["audio_bytes"]
    started = time.monotonic()
    id_args = [arg for n in ids for arg in ("--id", str(n))]
    outcome = probe("replay", base, AUDIO, str(clients), str(seconds), *id_args, *extra)
    elapsed = time.monotonic() - started
    box = fx.stats()["audio_bytes"] - before
    outcome["seconds"] = elapsed
    outcome["box_bytes"] = box
    outcome["box_mib_per_minute"] = box / elapsed * 60 / 2**20
    outcome["replays_per_second"] = outcome["n"] / elapsed
    return outcome


def run():
    fx = Fixture()
    try:
        ids = fx.recordings()
        bases = {
            "passthrough": fx.gateway("passthrough", ""),
            "store": fx.gateway("store", f'[cache.audio]\npath = "{fx.work}/audio"\nmax_bytes = "1GiB"'),
        }
        rounds = {"passthrough": [], "store": []}
        for round_ in range(ROUNDS):
            # Alternate which one goes first, so drift on the host falls on both.
            order = ["passthrough", "store"] if round_ % 2 == 0 else ["store", "passthrough"]
            for name in order:
                outcome = replay(fx, bases[name], ids, CLIENTS, SECONDS)
                rounds[name].append(outcome)
                log(f"round {round_ + 1} {name}: {outcome}")
        ranges = {}
        for name in ("store", "passthrough"):
            ranges[name] = replay(fx, bases[name], ids, RANGE_CLIENTS, RANGE_SECONDS,
                                  "--header", f"Range: {RANGE}")
            log(f"range {name}: {ranges[name]}")
        return {
            "date": time.strftime("%Y-%m-%d"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip(),
            "recordings": len(ids),
            "recording_bytes": fx.stats()["audio_length"],
            "rounds": rounds,
            "ranges": ranges,
        }
    finally:
        fx.close()


def block(r):
    passthrough, store = r["rounds"]["passthrough"], r["rounds"]["store"]
    warm = store[1:] or store
    cold = store[0]
    ranges = r["ranges"]
    rows = [
        "| row | pass-through (no `[cache.audio]`) | audio store |",
        "|---|---|---|",
        f"| box audio MiB per minute, every round (median, min to max) | "
        f"{spread([x['box_mib_per_minute'] for x in passthrough], 1)} | "
        f"{spread([x['box_mib_per_minute'] for x in store], 1)} |",
        f"| the same, the store's first (cold) round / its later rounds | | "
        f"{cold['box_mib_per_minute']:.1f} / {spread([x['box_mib_per_minute'] for x in warm], 1)} |",
        f"| recordings replayed per second | {spread([x['replays_per_second'] for x in passthrough], 1)} | "
        f"{spread([x['replays_per_second'] for x in store], 1)} |",
        f"| replay p50 ms | {spread([x['p50_ms'] for x in passthrough], 2)} | "
        f"{spread([x['p50_ms'] for x in store], 2)} |",
        f"| replay p99 ms | {spread([x['p99_ms'] for x in passthrough], 2)} | "
        f"{spread([x['p99_ms'] for x in store], 2)} |",
        f"| 64 KiB `Range` p50 / p99 ms ({RANGE_CLIENTS} clients) | "
        f"{ranges['passthrough']['p50_ms']:.3f} / {ranges['passthrough']['p99_ms']:.3f} | "
        f"{ranges['store']['p50_ms']:.3f} / {ranges['store']['p99_ms']:.3f} |",
        f"| box audio bytes during the range requests | {ranges['passthrough']['box_bytes']:,} | "
        f"{ranges['store']['box_bytes']:,} |",
    ]
    later = sum(x["box_bytes"] for x in warm) if store[1:] else 0
    after = (f"and {later / 2**20:.1f} MiB in its {len(warm)} later rounds" if later
             else f"and nothing in its {len(warm)} later rounds")
    prose = (
        f"Measured on {r['date']} at {r['commit']}, {len(passthrough)} alternating rounds of "
        f"{SECONDS:.0f} s each, on this machine (servers not pinned): {CLIENTS} clients replay "
        f"the same {r['recordings']} recordings of {r['recording_bytes'] / 2**20:.0f} MiB. Without the audio store the box sent "
        f"{spread([x['box_mib_per_minute'] for x in passthrough], 1)} MiB of audio per minute "
        f"(the clients ask as fast as answers come, so that is what this machine moves); with "
        f"it, {cold['box_bytes'] / 2**20:.1f} MiB in the store's first round "
        f"({cold['box_bytes'] / r['recording_bytes']:.0f} downloads of {r['recordings']} "
        f"recordings) {after}, while it answered "
        f"{spread([x['replays_per_second'] for x in store], 1)} replays per second against "
        f"{spread([x['replays_per_second'] for x in passthrough], 1)}. A 64 KiB range took {ranges['store']['p50_ms']:.3f} ms at the median from "
        f"disk, against {ranges['passthrough']['p50_ms']:.3f} ms through to the box."
    )
    return "\n".join(rows) + "\n\n" + prose + "\n"


def write(r):
    heading = "## Replaying recordings: the audio store\n\n`python3 bench/replay.py`"
    write_results("replay", r, block(r), heading)


def main():
    for tool in (BIN, PROBE):
        if not os.path.exists(tool):
            raise SystemExit(f"{tool} is missing: cargo build --release --examples")
    if sys.argv[1:] == ["--rewrite"]:
        with open(os.path.join(RESULTS, "replay.json")) as f:
            return write(json.load(f))
    write(run())


if __name__ == "__main__":
    main()
