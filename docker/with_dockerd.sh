#!/usr/bin/env bash
# Runs a command with a Docker engine: the one that answers, else a dockerd started here (as root) and
# stopped again when the command ends. When no engine can be had it prints
# "with_dockerd: no Docker engine: REASON" and exits 77; tests/test_compose.py reports that as a skip.
set -uo pipefail

if docker info >/dev/null 2>&1; then
    exec "$@"
fi
skip() { echo "with_dockerd: no Docker engine: $*" >&2; exit 77; }
command -v docker >/dev/null || skip "the docker client is not installed"
command -v dockerd >/dev/null || skip "dockerd is not installed"
[ "$(id -u)" = 0 ] || skip "none answers this user (docker info) and starting dockerd needs root"

log=${DOCKERD_LOG:-/var/tmp/tandem-dockerd.log}
dockerd >"$log" 2>&1 &
pid=$!
stop_dockerd() {
    kill -TERM "$pid" 2>/dev/null || return 0
    # dockerd stops its containers and its containerd first; give it that long, then no more.
    for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null
}
trap stop_dockerd EXIT
for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
done
docker info >/dev/null 2>&1 || skip "dockerd did not start: $(tail -n 3 "$log" | tr '\n' ' ')"
echo "with_dockerd: started dockerd (pid $pid, log $log); it stops when the command ends"
"$@"
