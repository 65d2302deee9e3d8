#!/usr/bin/env bash
# Boot deploy/miralix-gateway.service under a real systemd and walk deploy/README as an
# operator would: a minimal Debian root (debootstrap, kept in target/unit-root), booted with
# systemd-nspawn on the host's network, the gateway installed by hand (README step 1), the
# example configuration edited for an account on the simulated box, the secret and the TLS key
# as credentials, HTTPS on port 443. Then checks what only systemd can show: Type=notify and the
# watchdog, DynamicUser with its state and log directories, LoadCredential=, the port below 1024
# through the ambient capability, the sandbox and system-call filter (any denied call the
# gateway needs fails a request or the start), reload, a restart that starts warm, the audit
# log's rotation by deploy/logrotate, journal priorities, no secret in the journal, /metrics's
# process figures under ProcSubset=pid, the status page, the exposure score, and a clean stop.
#
#   bash deploy/check-unit.sh [BINARY]     # default target/debug/miralix-gateway; as root
#
# Needs root, systemd-nspawn (systemd-container) and debootstrap, which it installs with
# apt-get if missing, and Debian's mirror for the first run. CI runs it after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=$(realpath "${1:-target/debug/miralix-gateway}")
root=${CHECK_UNIT_ROOT:-$PWD/target/unit-root}
mirror=${CHECK_UNIT_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d)
failures=0

[ "$(id -u)" = 0 ] || { echo "check-unit: needs root (systemd-nspawn boots the container)"; exit 1; }
[ -x "$binary" ] || { echo "check-unit: no binary at $binary (cargo build first)"; exit 1; }
missing=()
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "check-unit: installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

ok() { echo "  ok: $*"; }
fail() { echo "  FAIL: $*"; failures=$((failures + 1)); }
check() { # check "what" command...: ok when the command succeeds
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then ok "$what"; else fail "$what"; fi
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

nspawn_pid=
box_pid=
cleanup() {
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    kill -TERM "$nspawn_pid" 2>/dev/null || true   # the container powers off
    for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$nspawn_pid" 2>/dev/null || true
  fi
  [ -n "$box_pid" ] && kill "$box_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. A minimal Debian of the host's release, made once and kept.
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
packages=systemd,systemd-sysv,dbus,logrotate
if [ "$(cat "$root/.complete" 2>/dev/null)" != "$suite $packages" ]; then
  echo "check-unit: debootstrap $suite ($packages) into $root"
  rm -rf "$root"
  debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
    > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  echo "$suite $packages" > "$root/.complete"
fi
# Nothing from an earlier run: no configuration, no state, no journal.
rm -rf "$root/etc/miralix-gateway" "$root/etc/systemd/system/miralix-gateway.service"* \
  "$root/etc/logrotate.d/miralix-gateway" \
  "$root/etc/systemd/system/multi-user.target.wants/miralix-gateway.service" \
  "$root/var/lib/private/miralix-gateway" "$root/var/lib/miralix-gateway" \
  "$root/var/log/private/miralix-gateway" "$root/var/log/miralix-gateway" "$root/var/log/journal"/*
rm -f "$root/etc/machine-id"

# 2. The simulated box on the host's loopback, which the container shares.
box_port=$(free_port); plain_port=$(free_port); admin_port=$(free_port)
secret="unit-check-secret-$(openssl rand -hex 8)"
printf %s "$secret" > "$work/secret"
"$binary" simulate --listen "127.0.0.1:$box_port" --ca-out "$work/box-ca.pem" \
  --secret-file "$work/secret" > "$work/box.log" 2>&1 &
box_pid=$!
for _ in $(seq 100); do [ -s "$work/box-ca.pem" ] && break; sleep 0.1; done

# 3. Install by hand (deploy/README step 1) and configure (steps 2 to 4).
install -m 0755 "$binary" "$root/usr/bin/miralix-gateway"
install -m 0644 deploy/miralix-gateway.service "$root/etc/systemd/system/"
install -m 0644 deploy/logrotate "$root/etc/logrotate.d/miralix-gateway"
etc=$root/etc/miralix-gateway
install -d -m 0755 "$etc" "$etc/tls"
install -d -m 0700 "$etc/credentials"
pin=$(openssl s_client -connect "127.0.0.1:$box_port" </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256)
api_key=$(openssl rand -hex 24)
hash=$(printf %s "$api_key" | sha256sum | cut -d' ' -f1)
(umask 077; printf %s "$secret" > "$etc/credentials/greenbox-secret")
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$work/gw.key" -out "$work/gw.crt" 2>/dev/null
install -m 0644 "$work/gw.crt" "$etc/tls/gateway.crt"
install -m 0600 "$work/gw.key" "$etc/credentials/tls-key"
install -d "$root/etc/systemd/system/miralix-gateway.service.d"
install -m 0644 deploy/credentials.conf "$root/etc/systemd/system/miralix-gateway.service.d/"
python3 - config/example.toml "$etc/gateway.toml" "$plain_port" "$admin_port" "$box_port" "$pin" "$hash" <<'EOF'
import sys
source, target, plain, admin, box, pin, key_hash = sys.argv[1:]
text = open(source).read().split("[accounts.greenbox]")[0]
def replace(old, new):
    global text
    assert old in text, f"config/example.toml no longer has {old!r}"
    text = text.replace(old, new, 1)
replace('listen = "0.0.0.0:8080"', f'listen = "127.0.0.1:443"\nplain_listen = "127.0.0.1:{plain}"')
replace('listen = "127.0.0.1:9091"', f'listen = "127.0.0.1:{admin}"')
replace('format = "text"', 'format = "text"\naudit_file = "/var/log/miralix-gateway/audit.log"')
text += f'''
[server.tls]
cert = "/etc/miralix-gateway/tls/gateway.crt"
key_credential = "tls-key"

[accounts.greenbox]
base_url = "https://127.0.0.1:{box}"
pin_sha256 = "{pin}"
shared_secret_credential = "greenbox-secret"
api_key_hashes = ["{key_hash}"]
'''
open(target, "w").write(text)
EOF

# 4. Boot.
echo "check-unit: booting $root under systemd-nspawn"
systemd-nspawn -D "$root" -b --register=no --keep-unit --console=passive > "$work/boot.log" 2>&1 &
nspawn_pid=$!
leader=
for _ in $(seq 150); do
  leader=$(pgrep -P "$nspawn_pid" | head -1 || true)
  if [ -n "$leader" ]; then
    state=$(nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null || true)
    case $state in running|degraded) break ;; esac
  fi
  kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/boot.log"; echo "check-unit: the container did not boot"; exit 1; }
  sleep 0.2
done
in_box() { nsenter -t "$leader" -a "$@"; }
in_box systemctl is-system-running >/dev/null 2>&1 || [ "$(in_box systemctl is-system-running)" = degraded ] \
  || { echo "check-unit: systemd in the container is not up"; exit 1; }
ok "systemd $(in_box systemctl --version | head -1 | cut -d' ' -f2) is PID 1 in the container"

# 5. Start and check, as deploy/README goes on.
journal() { in_box journalctl -u miralix-gateway --no-pager -o cat "$@"; }
if in_box systemctl enable --now miralix-gateway >/dev/null 2>&1; then
  ok "systemctl enable --now miralix-gateway"
else
  fail "the unit did not start:"; journal -n 30; exit 1
fi
check "Type=notify: the unit reports \"serving\"" test "$(in_box systemctl show -p StatusText --value miralix-gateway)" = serving
check "WatchdogSec=: the gateway pings the watchdog" sh -c "nsenter -t $leader -a journalctl -u miralix-gateway -o cat | grep -q 'watchdog enabled'"
uid=$(in_box stat -c %u "/proc/$(in_box systemctl show -p MainPID --value miralix-gateway)" || true)
# systemd hands dynamic users out of 61184 to 65519.
check "DynamicUser=: runs as uid $uid" test "${uid:-0}" -ge 61184 -a "${uid:-0}" -le 65519

list="https://localhost/mot/greenbox/agents/id/103/recordings"
status() { curl -s -o /dev/null -w '%{http_code}' --cacert "$work/gw.crt" "$@"; }
cache_status() { curl -s -D - -o /dev/null --cacert "$work/gw.crt" -H "X-Api-Key: $api_key" "$1" | tr -d '\r' | sed -n 's/^cache-status: //ip'; }
check "port 443 (CAP_NET_BIND_SERVICE) answers 401 without a key" test "$(status "$list")" = 401
first=$(cache_status "$list"); second=$(cache_status "$list")
case $first in *fwd=miss*) ok "a key's first request goes to the box over pinned TLS: $first" ;; *) fail "first request: '$first'" ;; esac
case $second in *hit*) ok "hit: $second" ;; *) fail "second request: '$second'" ;; esac
# That miss's list was compressed and parsed after its answer, on threads that lower their own
# priority (SystemCallFilter= lets setpriority through): nice, field 19 of each thread's stat.
main_pid=$(in_box systemctl show -p MainPID --value miralix-gateway)
finishers() {
  in_box sh -c "for t in /proc/$main_pid/task/*; do [ \"\$(cat \$t/comm)\" = miralix-finish ] && cut -d' ' -f19 \$t/stat; done" 2>/dev/null | sort -u | tr '\n' ' '
}
for _ in $(seq 50); do [ -n "$(finishers)" ] && break; sleep 0.1; done
check "the threads that finish entries after the answer run at nice 19 (nice: $(finishers))" test "$(finishers)" = "19 "
# The reload is a SIGHUP: its outcome is in the journal moments later.
reloads() { journal | grep -c 'configuration reloaded' || true; }
in_box systemctl reload miralix-gateway 2>/dev/null || fail "systemctl reload miralix-gateway"
for _ in $(seq 50); do [ "$(reloads)" -gt 0 ] && break; sleep 0.1; done
check "systemctl reload: configuration reloaded" test "$(reloads)" -gt 0
in_box systemctl restart miralix-gateway 2>/dev/null || fail "systemctl restart miralix-gateway"
warm=$(cache_status "$list")
case $warm in *detail=disk*) ok "after a restart, served from the disk tier: $warm" ;; *) fail "after a restart: '$warm'" ;; esac
check "StateDirectory: cache.redb, private to the service" sh -c "stat -c '%a' '$root/var/lib/private/miralix-gateway/cache.redb' | grep -qx 600"
logs=$root/var/log/private/miralix-gateway
reads() { grep -c '"resource"' "$1" 2>/dev/null || true; }
check "LogsDirectory: the audit log has the 3 reads" test "$(reads "$logs/audit.log")" = 3
# Rotation as logrotate's timer would run it: the file moves, the reload opens a new one.
before=$(reloads)
in_box logrotate -f /etc/logrotate.d/miralix-gateway || fail "logrotate -f /etc/logrotate.d/miralix-gateway"
for _ in $(seq 50); do [ "$(reloads)" -gt "$before" ] && break; sleep 0.1; done
cache_status "$list" >/dev/null
check "logrotate: audit.log.1 keeps the 3 reads, the next read is in a new audit.log" \
  test "$(reads "$logs/audit.log.1")/$(reads "$logs/audit.log")" = 3/1
# A warning reaches the journal as one: the box goes away, a new agent is asked for.
kill "$box_pid"; wait "$box_pid" 2>/dev/null || true; box_pid=
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/gw.crt" -H "X-Api-Key: $api_key" "https://localhost/mot/greenbox/agents/id/104/recordings")
check "the box down: a new agent gets $code, a cached one is still a hit" sh -c "case '$code' in 502|503|504) true;; *) false;; esac && curl -s -D - -o /dev/null --cacert '$work/gw.crt' -H 'X-Api-Key: $api_key' '$list' | grep -qi '^cache-status: .*hit'"
check "journalctl -p warning lists the failed fetch" sh -c "nsenter -t $leader -a journalctl -u miralix-gateway -p warning -o cat | grep -q 'upstream fetch failed'"
check "no secret in the journal (shared secret, API key, TLS key)" sh -c "! nsenter -t $leader -a journalctl -o cat | grep -qF -e '$secret' -e '$api_key' -e \"\$(sed -n 2p '$work/gw.key')\""
score=$(in_box systemd-analyze security miralix-gateway --no-pager 2>/dev/null | sed -n 's/.*exposure level for miralix-gateway.service: \([0-9.]*\).*/\1/p')
curl -s "http://127.0.0.1:$admin_port/metrics" > "$work/metrics" || true
check "/metrics under ProtectProc=invisible and ProcSubset=pid: the process's own figures" \
  sh -c "grep -q '^process_resident_memory_bytes [1-9]' '$work/metrics' && grep -q '^process_max_fds [1-9]' '$work/metrics' && grep -q '^process_open_fds [1-9]' '$work/metrics'"
check "the status page answers on the admin listener" test "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/")" = 200
check "systemd-analyze security on the running unit: $score (at most 2.0)" python3 -c "import sys; sys.exit(not float('${score:-99}') <= 2.0)"
in_box systemctl stop miralix-gateway 2>/dev/null || fail "systemctl stop miralix-gateway"
check "systemctl stop: inactive, exit status 0" sh -c "test \"\$(nsenter -t $leader -a systemctl show -p ActiveState --value miralix-gateway)\" = inactive && test \"\$(nsenter -t $leader -a systemctl show -p ExecMainStatus --value miralix-gateway)\" = 0"
seccomp=$(journal | grep -ci 'operation not permitted\|bad system call' || true)
check "no call refused by the sandbox in the journal" test "$seccomp" = 0

if [ "$failures" -gt 0 ]; then
  echo "check-unit: $failures check(s) failed; the unit's journal:"
  journal -n 40 || true
  exit 1
fi
echo "check-unit: the unit runs as deploy/README describes"
