#!/usr/bin/env bash
# Instructions per call of benches/pass_through.rs's cases, bare and behind the layer, counted by
# valgrind (callgrind): repeatable whatever else the machine is doing, unlike divan's timings on a
# shared VM. Each case runs alone (PASS_THROUGH_COUNT) for a short and a long loop; the difference
# of the two totals over the difference of the call counts leaves out start-up.
#
#   cargo bench --bench pass_through --no-run
#   bash benches/pass_through_instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bench=$(ls -t target/release/deps/pass_through-* 2>/dev/null | grep -v '\.d$' | head -1)
[ -n "$bench" ] || { echo "build it first: cargo bench --bench pass_through --no-run" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
total() {
  PASS_THROUGH_COUNT="$1:$2:$3" valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bench" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf '%-24s %8s %8s %8s\n' case bare layered added
for case in "no prefer" "prefer return=minimal" "status-like path" "post"; do
  declare -A per
  for side in bare layered; do
    short=$(total "$side" "$case" 2000)
    long=$(total "$side" "$case" 22000)
    per[$side]=$(( (long - short) / 20000 ))
  done
  printf '%-24s %8d %8d %8d\n' "$case" "${per[bare]}" "${per[layered]}" $(( per[layered] - per[bare] ))
done
