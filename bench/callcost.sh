#!/usr/bin/env bash
# Cost of one forwarded call inside the proxy, counted rather than timed, so it repeats
# exactly on a noisy machine: heap allocations (valgrind's dhat), instructions
# (callgrind) and system calls (strace -c, by name) per unary SayHello, as the
# difference between a run of N1 and of N2 calls (start-up and shutdown cancel out).
#   bench/callcost.sh [PROXY_BIN] [SERVER_BIN]     (defaults: target/release/{proxy,server})
# PROXY_ARGS adds proxy flags: PROXY_ARGS='--relay off' for the HTTP/2 stack, or
# PROXY_ARGS="--service-config config/outlier.json" for the cost with health checking
# and outlier detection on.
set -euo pipefail
proxy=${1:-target/release/proxy}
server=${2:-target/release/server}
client=${CLIENT_BIN:-target/release/client}
n1=${N1:-200} n2=${N2:-1200}
command -v valgrind >/dev/null || { echo "callcost: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v strace >/dev/null || { echo "callcost: needs strace (apt-get install strace)" >&2; exit 1; }
work=$(mktemp -d)
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
pids=()
trap cleanup EXIT

"$server" --listen 127.0.0.150:50251 --name cost >"$work/server.log" 2>&1 &
pids+=($!)

# run TOOL CALLS: prints the tool's total (blocks, instructions or system calls) for a proxy
# that forwarded CALLS calls.
run() {
  local tool=$1 calls=$2 out="$work/$1-$2.log"
  local under=(valgrind --tool="$tool" --"$tool"-out-file=/dev/null --log-file="$out")
  [ "$tool" = strace ] && under=(strace -f -c -o "$out")
  # shellcheck disable=SC2086 # PROXY_ARGS is a list of flags
  local cmd=("$proxy" --listen 127.0.0.150:50250 --target 127.0.0.150:50251 --threads 1 --admin-listen off ${PROXY_ARGS:-})
  "${under[@]}" "${cmd[@]}" >"$work/$tool-$calls.out" 2>&1 &
  local vg=$!
  for _ in $(seq 300); do
    "$client" --proxy 127.0.0.150:50250 --timeout 2s hello >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$client" --proxy 127.0.0.150:50250 load --rate 200 --concurrency 1 --quiet --timeout 5s \
    --duration "$(awk "BEGIN{print ($calls - 1) / 200}")s" >"$work/load.log" 2>&1 || true
  # Under strace the proxy is strace's child; strace writes its table when it exits.
  if [ "$tool" = strace ]; then kill -TERM "$(pgrep -P "$vg")"; else kill -TERM "$vg"; fi
  wait "$vg" || true
  local done_calls
  done_calls=$(grep -oE 'ok [0-9]+' "$work/load.log" | head -1 | cut -d' ' -f2)
  case $tool in
    dhat) echo "$(grep -oE 'Total: +[0-9,]+ bytes in [0-9,]+ blocks' "$out" | grep -oE '[0-9,]+ blocks' | tr -d ', blocks') $((done_calls + 1))" ;;
    callgrind) echo "$(grep -oE 'Collected : [0-9]+' "$out" | grep -oE '[0-9]+') $((done_calls + 1))" ;;
    strace) echo "$(awk '$NF == "total" {print $4}' "$out") $((done_calls + 1))" ;;
  esac
}

# by_name N1_CALLS N2_CALLS: each syscall's count per call between the two strace runs.
by_name() {
  awk -v ca="$1" -v cb="$2" '
    FNR == 1 { f++ }
    /^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ && $NF != "total" { n[f, $NF] = $4; names[$NF] }
    END { for (s in names) { d = (n[2, s] - n[1, s]) / (cb - ca); if (d >= 0.05) printf "%s %.1f\n", s, d } }
  ' "$work/strace-$n1.log" "$work/strace-$n2.log" | sort -k2 -nr | awk '{printf "%s%s %s", sep, $1, $2; sep=", "} END {print ""}'
}

printf '%-28s %12s\n' "per forwarded call" "$(basename "$(dirname "$(readlink -f "$proxy")")")/$(basename "$proxy")"
for tool in dhat callgrind strace; do
  read -r a ca < <(run "$tool" "$n1")
  read -r b cb < <(run "$tool" "$n2")
  case $tool in
    dhat) label="heap allocations" ;;
    callgrind) label="instructions" ;;
    strace) label="system calls" ;;
  esac
  digits=$([ "$tool" = callgrind ] && echo 0 || echo 1)
  printf '%-28s %12s\n' "$label" "$(awk "BEGIN{printf \"%.${digits}f\", ($b - $a) / ($cb - $ca)}")"
  [ "$tool" = strace ] && printf '  %s\n' "$(by_name "$ca" "$cb")"
done
