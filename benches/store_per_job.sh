#!/usr/bin/env bash
# What one job costs each shared store (issue #16): the demo (release build) runs JOBS quick
# interaction jobs (`GET /fhir/Patient?_count=5` with `Prefer: respond-async`), each polled once
# after it ended, against Redis (a database index of its own) and then PostgreSQL (a table of
# its own); Redis's MONITOR counts round trips and the commands scripts run, PostgreSQL's WAL
# position the bytes written, both per job and per poll; and keys, bytes per job.
#
#   bash benches/store_per_job.sh           # JOBS=1000, REDIS_URL and DATABASE_URL as in .ci/run
#
# Needs curl, redis-cli and psql, and quiet servers: other clients' commands would be counted.
# The demo's table is PostgresStore's default one, shared with earlier demo runs: rows are counted
# before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-1000}"
REDIS_HOST=127.0.0.1 REDIS_PORT=6379 REDIS_DB=7
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
cargo build -q --release --example server --features redis,postgres
demo=target/release/examples/server
log=$(mktemp)
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT

start() {
    "$demo" --addr 127.0.0.1:0 --store "$1" >"$log" 2>/dev/null &
    pid=$!
    for _ in $(seq 1 100); do
        base=$(sed -n 's/^listening on //p' "$log" | head -1)
        [ -n "$base" ] && return
        sleep 0.1
    done
    echo "the demo did not start" >&2
    exit 1
}

# Kicks off JOBS jobs, waits until each has ended (polling), then polls each once more.
jobs() {
    urls=()
    for _ in $(seq 1 "$JOBS"); do
        urls+=("$(curl -s -D - -o /dev/null -H 'Prefer: respond-async' "$base/Patient?_count=5" |
            tr -d '\r' | sed -n 's/^[Cc]ontent-[Ll]ocation: //p')")
    done
    waits=0
    for url in "${urls[@]}"; do
        while [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" = 202 ]; do
            waits=$((waits + 1))
            sleep 0.05
        done
        waits=$((waits + 1))
    done
}
poll_all() {
    for url in "${urls[@]}"; do curl -s -o /dev/null "$url"; done
}

redis_stat() { redis-cli -h $REDIS_HOST -p $REDIS_PORT INFO "$1" | tr -d '\r' | sed -n "s/^$2://p"; }

echo "== Redis (database $REDIS_DB), $JOBS jobs"
redis-cli -h $REDIS_HOST -p $REDIS_PORT -n $REDIS_DB FLUSHDB >/dev/null
start "redis://$REDIS_HOST:$REDIS_PORT/$REDIS_DB"
sleep 1
# MONITOR tells a client's command (a round trip) from one run inside a script ("lua").
monitor() { redis-cli -h $REDIS_HOST -p $REDIS_PORT MONITOR >"$1" & mon=$!; sleep 0.2; }
count() { grep -c "^[0-9.]* \[$REDIS_DB $1" "$2" || true; }
m0=$(redis_stat memory used_memory)
monitor "$log.jobs"; jobs; sleep 0.5; kill $mon
monitor "$log.polls"; poll_all; sleep 0.5; kill $mon
m1=$(redis_stat memory used_memory)
keys=$(redis-cli -h $REDIS_HOST -p $REDIS_PORT -n $REDIS_DB DBSIZE)
kill "$pid"; wait "$pid" 2>/dev/null || true
poll_trips=$(count 127 "$log.polls")
job_trips=$(( $(count 127 "$log.jobs") - waits * poll_trips / JOBS ))
echo "round trips per 100 jobs (kick-off, run, end; the $waits polls while waiting left out): $(( job_trips * 100 / JOBS ))"
echo "commands run inside those scripts per 100 jobs: $(( $(count lua "$log.jobs") * 100 / JOBS ))"
echo "round trips per 100 polls of ended jobs: $(( poll_trips * 100 / JOBS ))"
echo "keys: $keys ($(( keys * 100 / JOBS )) per 100 jobs); memory: $(( (m1 - m0) / JOBS )) bytes per job (its result included)"
rm -f "$log.jobs" "$log.polls"
redis-cli -h $REDIS_HOST -p $REDIS_PORT -n $REDIS_DB FLUSHDB >/dev/null

echo "== PostgreSQL ($DATABASE_URL), $JOBS jobs"
q() { psql "$DATABASE_URL" -Atc "$1"; }
wal() { q "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"; }
start "$DATABASE_URL"
sleep 2
r0=$(q "SELECT count(*) FROM tower_fhir_async_jobs")
s0=$(q "SELECT pg_total_relation_size('tower_fhir_async_jobs')")
w0=$(wal)
jobs
w1=$(wal)
poll_all
w2=$(wal)
r1=$(q "SELECT count(*) FROM tower_fhir_async_jobs")
s1=$(q "SELECT pg_total_relation_size('tower_fhir_async_jobs')")
kill "$pid"; wait "$pid" 2>/dev/null || true
echo "WAL written for the jobs (and $waits polls while waiting): $(( (w1 - w0) / JOBS )) bytes per job"
echo "WAL written for one poll of each ended job: $(( w2 - w1 )) bytes in all (a poll writes nothing)"
echo "rows: $(( r1 - r0 )) new; table with indexes and TOAST grew by $(( (s1 - s0) / (r1 - r0) )) bytes per job"

# A Redis Cluster (CLUSTER_PORTS, default the three masters .ci/run starts on 7000-7002), when
# one answers: MONITOR on every master, memory and keys summed over them. The cluster must be
# quiet too (no test run against it meanwhile).
CLUSTER_PORTS="${CLUSTER_PORTS:-7000 7001 7002}"
first_port=${CLUSTER_PORTS%% *}
if redis-cli -h 127.0.0.1 -p "$first_port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then
    cargo build -q --release --example server --features redis-cluster
    nodes=$(for port in $CLUSTER_PORTS; do printf '127.0.0.1:%s,' "$port"; done)
    echo "== Redis Cluster (masters on ports $CLUSTER_PORTS), $JOBS jobs"
    sum() { local total=0; for port in $CLUSTER_PORTS; do
        total=$(( total + $(redis-cli -h 127.0.0.1 -p "$port" "$@" | tr -d '\r' | tail -1) )); done; echo $total; }
    used() { local total=0; for port in $CLUSTER_PORTS; do
        total=$(( total + $(redis-cli -h 127.0.0.1 -p "$port" INFO memory | tr -d '\r' | sed -n 's/^used_memory://p') )); done; echo $total; }
    start "redis-cluster://${nodes%,}"
    sleep 1
    cmonitor() { mons=(); for port in $CLUSTER_PORTS; do
        redis-cli -h 127.0.0.1 -p "$port" MONITOR >"$1.$port" & mons+=($!); done; sleep 0.2; }
    ccount() { cat "$2".* | grep -c "^[0-9.]* \[0 $1" || true; }
    k0=$(sum DBSIZE); m0=$(used)
    cmonitor "$log.jobs"; jobs; sleep 0.5; kill "${mons[@]}"
    cmonitor "$log.polls"; poll_all; sleep 0.5; kill "${mons[@]}"
    m1=$(used); k1=$(sum DBSIZE)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    poll_trips=$(ccount 127 "$log.polls")
    job_trips=$(( $(ccount 127 "$log.jobs") - waits * poll_trips / JOBS ))
    echo "round trips per 100 jobs (kick-off, run, end; the $waits polls while waiting left out): $(( job_trips * 100 / JOBS ))"
    echo "commands run inside those scripts per 100 jobs: $(( $(ccount lua "$log.jobs") * 100 / JOBS ))"
    echo "round trips per 100 polls of ended jobs: $(( poll_trips * 100 / JOBS ))"
    echo "keys: $(( k1 - k0 )) new ($(( (k1 - k0) * 100 / JOBS )) per 100 jobs); memory: $(( (m1 - m0) / JOBS )) bytes per job (its result included)"
    rm -f "$log".jobs.* "$log".polls.*
fi
