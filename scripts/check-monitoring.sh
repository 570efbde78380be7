#!/usr/bin/env bash
# Check the monitoring files in deploy/monitoring/ against promtool and a real Prometheus
# that scrapes a running coldgate:
#   1. `promtool check rules` and `promtool test rules` on the alerting rules;
#   2. deploy/monitoring/check_live.py starts coldgate (one service running the
#      simulated predictor) and Prometheus on loopback ports, causes cold starts, 503s
#      and 504s, then evaluates every expression of the Grafana dashboard and every
#      alerting rule in Prometheus. An expression that fails or returns no data fails
#      the check.
# Exits non-zero and names what failed.
#
# Usage: scripts/check-monitoring.sh
#   COLDGATE_BIN  coldgate binary to run (default: target/debug/coldgate, built here
#                 with `cargo build --locked --bin coldgate`).
#   PYTHON        Python 3.9 or newer for check_live.py (default: python3).
#
# When prometheus or promtool is missing, the Debian package `prometheus` is installed
# through apt-get (as root, or through sudo). Its system service is kept from starting
# and then masked, so the only Prometheus that runs is the one check_live.py starts on
# 127.0.0.1 and stops again.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

monitoring=deploy/monitoring
python="${PYTHON:-python3}"

fail() {
    echo "check-monitoring: $*" >&2
    exit 1
}

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        fail "installing prometheus needs root: run this script as root or install sudo" \
            "(or install the Debian package prometheus yourself)."
    fi
}

# Installs the Debian package without starting its service. A policy-rc.d that exits
# 101 makes invoke-rc.d and deb-systemd-invoke skip the start in the postinst. An
# existing policy-rc.d is left alone, so the service is stopped afterwards in any case.
install_prometheus() {
    command -v apt-get >/dev/null \
        || fail "prometheus and promtool not found and apt-get is missing. Install" \
            "Prometheus 2.x (the server and promtool) into PATH and run this script again."
    local policy=/usr/sbin/policy-rc.d
    local own_policy=false
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# Written by scripts/check-monitoring.sh during apt-get install.\nexit 101\n' \
            | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        own_policy=true
    fi
    echo "check-monitoring: installing the Debian package prometheus (service not started)"
    local status=0
    as_root apt-get update -qq || status=$?
    if [[ $status -eq 0 ]]; then
        # --no-install-recommends leaves out prometheus-node-exporter, another daemon.
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus || status=$?
    fi
    if $own_policy; then
        as_root rm -f "$policy"
    fi
    [[ $status -eq 0 ]] || fail "apt-get failed (exit status $status) while installing prometheus; see its output above."

    # Keep the packaged service (listening on all interfaces, port 9090) from running
    # now or after a reboot.
    if [[ -d /run/systemd/system ]]; then
        as_root systemctl stop prometheus.service || true
        as_root systemctl mask prometheus.service
    else
        if command -v service >/dev/null; then
            as_root service prometheus stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null; then
            as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
        # Masks the unit for a later boot with systemd: a mask is a link to /dev/null.
        if [[ -e /lib/systemd/system/prometheus.service && ! -e /etc/systemd/system/prometheus.service ]]; then
            as_root mkdir -p /etc/systemd/system
            as_root ln -s /dev/null /etc/systemd/system/prometheus.service
        fi
    fi
    local running
    running="$(prometheus_pids)"
    if [[ -n "$running" ]]; then
        fail "a prometheus process (pid $running) runs after the install. Stop it" \
            "(systemctl stop prometheus, or kill that pid) and run this script again."
    fi
}

# Prints the pids of running processes named prometheus. Reads /proc because procps
# (pgrep) is not installed on minimal Debian images.
prometheus_pids() {
    local dir
    for dir in /proc/[0-9]*; do
        if [[ "$(cat "$dir/comm" 2>/dev/null)" == prometheus ]]; then
            printf '%s ' "${dir#/proc/}"
        fi
    done
}

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    install_prometheus
fi
echo "check-monitoring: $(prometheus --version 2>&1 | head -1)"
echo "check-monitoring: $(promtool --version 2>&1 | head -1)"

# --- Rules: syntax and unit tests ---------------------------------------------------
echo "check-monitoring: promtool check rules $monitoring/alerts.yaml"
promtool check rules "$monitoring/alerts.yaml" \
    || fail "promtool check rules rejected $monitoring/alerts.yaml; fix the errors listed above."
echo "check-monitoring: promtool test rules $monitoring/alerts_test.yaml"
promtool test rules "$monitoring/alerts_test.yaml" \
    || fail "promtool test rules failed for $monitoring/alerts_test.yaml; the failing test" \
        "and the expected and actual alerts are listed above."

# --- Live check against coldgate and Prometheus --------------------------------------
if [[ -n "${COLDGATE_BIN:-}" ]]; then
    coldgate_bin="$COLDGATE_BIN"
else
    echo "check-monitoring: cargo build --locked --bin coldgate"
    cargo build --locked --bin coldgate \
        || fail "cargo build failed; fix the errors above, or set COLDGATE_BIN to a built coldgate binary."
    coldgate_bin="$repo_root/target/debug/coldgate"
fi
[[ -x "$coldgate_bin" ]] || fail "coldgate binary $coldgate_bin not found or not executable; set COLDGATE_BIN."
command -v "$python" >/dev/null || fail "interpreter '$python' not found. Install python3 or set PYTHON."

# check_live.py stops its processes itself within its own deadline; timeout is the
# backstop, and the processes it started die with it (PR_SET_PDEATHSIG).
timeout --kill-after=10 110 "$python" "$monitoring/check_live.py" \
    --coldgate "$coldgate_bin" \
    --prometheus "$(command -v prometheus)" \
    --dashboard "$monitoring/grafana-dashboard.json" \
    --rules "$monitoring/alerts.yaml" \
    --rule-tests "$monitoring/alerts_test.yaml" \
    || fail "the live check failed; see the messages above."
echo "check-monitoring: all checks passed"
