#!/usr/bin/env bash
# Installs what the benchmarks need beyond cargo: nginx (the proxy they compare with, and
# the static backend of the warm benchmark) and wrk (the load generator), from Debian's
# packages. The benchmarks run their own nginx processes with private configs; the system's
# nginx service is left installed but stopped if the package install started it.
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -eq 0 ]; then
    echo "bench-deps: nginx, wrk and taskset are installed"
    # The benchmarks look nginx up in PATH only.
    if ! command -v nginx >/dev/null 2>&1; then
        echo "bench-deps: nginx is /usr/sbin/nginx, which is not in PATH; add /usr/sbin to PATH for the warm benchmark"
    fi
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
nginx_was_running=false
if pgrep -x nginx >/dev/null 2>&1; then
    nginx_was_running=true
fi
echo "bench-deps: installing ${missing[*]} with apt-get"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"

# Debian's nginx package starts its service where the init system allows it.
if [ "$nginx_was_running" = false ] && pgrep -x nginx >/dev/null 2>&1; then
    echo "bench-deps: stopping the nginx service that the package install started"
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx; then
        $sudo systemctl stop nginx
    elif [ -f /run/nginx.pid ]; then
        $sudo kill -QUIT "$(cat /run/nginx.pid)"
    fi
fi
