#!/usr/bin/env bash
# Instructions per request of the gateway and of the plain hyper reverse proxy in
# benches/gateway.rs, counted by valgrind (callgrind): repeatable whatever else the machine is
# doing, unlike requests per second on a shared VM. Each side runs alone (GATEWAY_ONLY) for a
# short and a long round; the difference of the two runs' totals over the difference of their
# request counts leaves out start-up and warm-up. Prints both and their ratio.
#
#   cargo bench --features upstream --bench gateway --no-run
#   bash benches/gateway_instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bench=$(ls -t target/release/deps/gateway-* 2>/dev/null | grep -v '\.d$' | head -1)
[ -n "$bench" ] || { echo "build it first: cargo bench --features upstream --bench gateway --no-run" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
declare -A requests instructions
for ms in 2000 8000; do
  for side in proxy gateway; do
    log=$(GATEWAY_ONLY=$side GATEWAY_ROUNDS=1 GATEWAY_ROUND_MS=$ms GATEWAY_CONNECTIONS=8 \
      valgrind --tool=callgrind --callgrind-out-file="$out/$side.$ms" "$bench" 2>&1)
    requests[$side$ms]=$(sed -n 's/.*: \([0-9]*\) requests in all.*/\1/p' <<<"$log")
    instructions[$side$ms]=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' <<<"$log")
  done
done
per_request() {
  echo $(( (instructions[${1}8000] - instructions[${1}2000]) / (requests[${1}8000] - requests[${1}2000]) ))
}
proxy=$(per_request proxy)
gateway=$(per_request gateway)
echo "instructions per request: plain proxy $proxy, gateway $gateway"
echo "gateway throughput at equal instruction rate: $(( 1000 * proxy / gateway / 10 )).$(( 1000 * proxy / gateway % 10 )) % of the plain proxy (target >= 95 %)"
