#!/usr/bin/env bash
# The benchmark: miralix-gateway against nginx proxy_cache and a static-file reference, on this
# machine, in one run. Installs what it needs on Debian/Ubuntu, builds the load probe and the
# gateway (profile-guided, with bench/pgo.py, where llvm-profdata can be had), then runs
# bench/bench.py, bench/fleet.py and bench/replay.py. Results: bench/results/latest.{md,json},
# fleet.json, replay.json, ratios.png and the results sections of bench/README.md.
#
# Knobs: BENCH_ROUNDS (default 5), BENCH_DURATION (wrk duration per run, default 10s),
# BENCH_EQ_ROUNDS (equal-load rounds, default 9), BENCH_EQ_SECONDS (each equal-load run,
# default 5), BENCH_CLOSE_DURATION (each run with a new connection per request, default 5s),
# BENCH_POLL_SECONDS, BENCH_OUTAGE_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v gnuplot >/dev/null 2>&1 || need+=(gnuplot-nox)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "[bench] installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "[bench] needs at least 2 CPUs (servers on CPU 0, load generator on CPU 1)" >&2
  exit 1
fi

echo "[bench] building the release binary and the load probe"
cargo build --release --locked --bin miralix-gateway --example probe

# The gateway measured is the profile-guided build (bench/pgo.py), the one deploy/README.md
# installs, when this machine can make one: it needs llvm-profdata of rustc's own LLVM.
if ! python3 bench/pgo.py --check >/dev/null 2>&1; then
  llvm="llvm-$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
  echo "[bench] installing $llvm for the profile-guided build"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$llvm"; } ||
    echo "[bench] could not install $llvm"
fi
if python3 bench/pgo.py --check; then
  python3 bench/pgo.py
  export BENCH_GATEWAY="$PWD/target/pgo/release/miralix-gateway"
  export BENCH_GATEWAY_BUILD="profile-guided"
else
  echo "[bench] measuring the plain release build instead (bench/pgo.py --check says why)"
  export BENCH_GATEWAY_BUILD="release, not profile-guided"
fi

python3 bench/bench.py
# The second tier's rows (a fleet on one Redis, a restart on the disk tier).
python3 bench/fleet.py
# The audio store's rows (recordings replayed, with and without [cache.audio]).
exec python3 bench/replay.py
