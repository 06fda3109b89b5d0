#!/usr/bin/env bash
# End-to-end tests: the built gateway in front of real Mosquitto and RabbitMQ (web_mqtt) brokers, driven by MQTT.js
# in Node and by MQTT.js's browser bundle in headless Chromium (playwright-core). See tests/e2e/README.md.
#
# Idempotent: installs only what is missing (Debian packages mosquitto, rabbitmq-server, chromium; the npm packages
# pinned in tests/e2e/package-lock.json), builds nothing, and leaves no broker service running on a default port.
#
#   WS_GATEWAY_BIN   gateway binary to test (default target/debug/ws-gateway; build it first)
#   E2E_SKIP_INSTALL set to 1 to skip the apt/npm steps
#   scripts/e2e.sh --install-only   install the prerequisites and exit
#   scripts/e2e.sh [node --test args...]   e.g. scripts/e2e.sh --test-name-pattern=mosquitto
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

INSTALL_ONLY=0
if [[ "${1:-}" == "--install-only" ]]; then
  INSTALL_ONLY=1
  shift
fi

log() { printf 'e2e: %s\n' "$*" >&2; }

need_pkgs=()
pkg_missing() { ! dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'; }

install_debian() {
  pkg_missing mosquitto && need_pkgs+=(mosquitto)
  pkg_missing rabbitmq-server && need_pkgs+=(rabbitmq-server)
  { command -v chromium >/dev/null && ! pkg_missing chromium; } || need_pkgs+=(chromium)
  if [[ ${#need_pkgs[@]} -eq 0 ]]; then
    return 0
  fi
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages (${need_pkgs[*]}) and not root: install them first"
    exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' init scripts from starting system brokers on the default ports: a policy-rc.d that answers
  # 101 ("action forbidden") makes invoke-rc.d skip the start. Only add one (and remove it) if none is there.
  local own_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local aptlog rc=0
  aptlog="$(mktemp)"
  log "apt-get update"
  apt-get update -qq >"$aptlog" 2>&1 || log "apt-get update failed (continuing with the lists there are)"
  log "apt-get install ${need_pkgs[*]} (log: $aptlog)"
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" </dev/null >>"$aptlog" 2>&1 || rc=$?
  if [[ $own_policy -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
  if [[ $rc -ne 0 ]]; then
    tail -n 40 "$aptlog" >&2
    log "apt-get install failed ($rc)"
    exit $rc
  fi
  stop_system_brokers
}

# If a package install (or anything before) left the system services running, stop and disable them: the tests start
# their own brokers on private ports, and a system broker on 1883/5672/15675 would only confuse things.
stop_system_brokers() {
  local svc
  for svc in mosquitto rabbitmq-server; do
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    else
      if service "$svc" status >/dev/null 2>&1; then
        log "stopping system service $svc"
        service "$svc" stop >/dev/null 2>&1 || true
      fi
      update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
  done
  # rabbitmq-server's postinst starts an epmd (as user rabbitmq, on 0.0.0.0:4369) that no init system owns here.
  # The tests run their own epmd on a private port; end the one the install left behind.
  local pid
  for pid in $(pgrep -u rabbitmq -x epmd 2>/dev/null); do
    log "stopping the epmd (pid $pid) that the rabbitmq-server install started"
    kill "$pid" 2>/dev/null || true
  done
}

install_npm() {
  if [[ -d tests/e2e/node_modules/mqtt && -d tests/e2e/node_modules/playwright-core ]] \
     && [[ tests/e2e/node_modules/.package-lock.json -nt tests/e2e/package-lock.json ]]; then
    return 0
  fi
  log "npm install in tests/e2e"
  if [[ -f tests/e2e/package-lock.json ]]; then
    (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
  else
    (cd tests/e2e && npm install --no-audit --no-fund --loglevel=error)
  fi
}

if [[ "${E2E_SKIP_INSTALL:-0}" != "1" ]]; then
  install_debian
  install_npm
fi
[[ $INSTALL_ONLY -eq 1 ]] && exit 0

export WS_GATEWAY_BIN="${WS_GATEWAY_BIN:-target/debug/ws-gateway}"
if [[ ! -x "$WS_GATEWAY_BIN" ]]; then
  log "gateway binary $WS_GATEWAY_BIN not found or not executable: build it first (cargo build)"
  exit 2
fi
WS_GATEWAY_BIN="$(cd "$(dirname "$WS_GATEWAY_BIN")" && pwd)/$(basename "$WS_GATEWAY_BIN")"
export WS_GATEWAY_BIN

start=$(date +%s)
rc=0
node --test --test-concurrency=1 "$@" tests/e2e/ || rc=$?
log "node --test exited $rc after $(( $(date +%s) - start )) s"

# Eclipse Paho (Python) against the topic rules: paho-mqtt pinned in a venv under target/.
if [[ $# -eq 0 ]]; then
  venv="${CARGO_TARGET_DIR:-target}/e2e-venv"
  if ! "$venv/bin/python" -c 'import paho.mqtt' 2>/dev/null; then
    log "pip install paho-mqtt==2.1.0 into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check paho-mqtt==2.1.0 || rc=1
  fi
  loadgen="${WS_LOADGEN_BIN:-$(dirname "$WS_GATEWAY_BIN")/ws-loadgen}"
  "$venv/bin/python" tests/e2e/paho_edge.py "$WS_GATEWAY_BIN" "$loadgen" || rc=1
fi
exit $rc
