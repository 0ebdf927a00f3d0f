#!/usr/bin/env bash
# Install wrk from Debian's packages when it is missing (the bench needs it for load).
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "wrk is missing; install it as root: apt-get update && apt-get install -y wrk" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq wrk >/dev/null
command -v wrk
