#!/usr/bin/env bash
# Runs every benchmark with its default arguments (held with 10,000 requests) and writes
# the output to target/bench-results/DATE.log. The runs took about 8 minutes on a 2-vCPU
# VM, plus the release build. Run it on an otherwise idle machine: the load generator,
# the proxies and the backends share its CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bench-deps.sh
mkdir -p target/bench-results
log="target/bench-results/$(date -u +%Y-%m-%dT%H%M%SZ).log"
{
    echo "date: $(date -u)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src has uncommitted changes)')"
    echo "kernel: $(uname -r)"
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread\(s\) per core|Hypervisor vendor):'
    echo "memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
    rustc --version
    nginx -v 2>&1
    wrk -v 2>&1 | head -1 || true
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$log"

run() {
    echo | tee -a "$log"
    echo "### cargo bench --bench $*" | tee -a "$log"
    cargo bench --bench "$@" 2>&1 | tee -a "$log"
}

run warm
run release
run release -- --silent
run held -- 10000
run services
run storm
echo "results: $log"
