#!/usr/bin/env bash
# End to end on the real Docker engine: what a user runs, with the outcomes checked.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-lbsandbox}
PORT=${PROXY_PORT:-50050}

step() { printf '\n### %s\n' "$*"; }
fail() { echo "E2E FAILED: $*" >&2; exit 1; }
cleanup() { ./scripts/sandbox.sh down >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "task up"
task up
proxy=$(docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --filter label=com.docker.compose.service=proxy)
# Read whole before grep: `grep -q` stops at the first match and, under pipefail,
# docker's broken pipe would fail the check.
logs=$(docker logs "$proxy" 2>&1)
grep -q 'with the frame relay' <<<"$logs" || fail "the proxy did not start with the frame relay (--relay auto)"

step "grpcurl through the proxy"
out=$(grpcurl -plaintext -d '{"name":"World"}' "localhost:$PORT" hello.HelloService/SayHello)
echo "$out"
grep -q '"message": "Hello, World! (from server server[12] on node-a' <<<"$out" || fail "SayHello did not reach a node-a replica"
out=$(grpcurl -plaintext "localhost:$PORT" list)
echo "$out"
grep -qx 'hello.HelloService' <<<"$out" || fail "reflection list through the proxy"
out=$(grpcurl -plaintext "localhost:$PORT" describe hello.HelloService)
grep -q 'rpc SayHelloStream' <<<"$out" || fail "reflection describe through the proxy"
echo "describe: ok"
out=$(grpcurl -plaintext "localhost:$PORT" grpc.health.v1.Health/Check)
grep -q SERVING <<<"$out" || fail "proxy health"

step "task verify-lb (all calls on node-a, each within ±10%)"
task verify-lb -- --check

step "task verify-lb:direct (client-side balancing inside the network)"
task verify-lb:direct -- --check

step "task failover"
task failover

step "task simulate-rolling-update"
task simulate-rolling-update

step "task demo:retry (0 failures with the policy)"
task demo:retry

step "task demo:hedging (p99 under half without hedging)"
task demo:hedging

step "upstream HTTP/3: UPSTREAM_PROTOCOL=h3 task up"
task down >/dev/null
UPSTREAM_PROTOCOL=h3 task up
out=$(dist/client --http3 --ca-cert certs/ca.pem hello)
echo "$out"
grep -q 'on node-a' <<<"$out" || fail "HTTP/3 front to a node-a replica"

step "upstream HTTP/3: verify-lb, failover, rolling update"
task verify-lb -- --check
UPSTREAM_PROTOCOL=h3 task failover
UPSTREAM_PROTOCOL=h3 task simulate-rolling-update

step "HTTP/2 stack: RELAY=off task up"
task down >/dev/null
RELAY=off task up
proxy=$(docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --filter label=com.docker.compose.service=proxy)
logs=$(docker logs "$proxy" 2>&1)
grep -q 'with the HTTP/2 stack (--relay off)' <<<"$logs" || fail "the proxy did not start with --relay off"
out=$(grpcurl -plaintext -d '{"name":"World"}' localhost:50050 hello.HelloService/SayHello)
echo "$out"
grep -q 'on node-a' <<<"$out" || fail "grpcurl through the HTTP/2 stack to a node-a replica"

step "HTTP/2 stack: verify-lb, failover, rolling update"
RELAY=off task verify-lb -- --check
RELAY=off task failover
RELAY=off task simulate-rolling-update

step "Kubernetes discovery: DISCOVERY=kubernetes task up (slice-api, EndpointSlices)"
task down >/dev/null
export DISCOVERY=kubernetes
task up
out=$(grpcurl -plaintext -d '{"name":"World"}' "localhost:$PORT" hello.HelloService/SayHello)
echo "$out"
grep -q '"node": "node-a"' <<<"$out" || fail "kubernetes discovery: a node-a replica answers"
curl -fsS "localhost:${PROXY_ADMIN_PORT:-9901}/admin/endpoints" | grep -q '"target": "kubernetes:///server.default:grpc"' \
  || fail "kubernetes discovery: the proxy watches the Service"

step "Kubernetes discovery: verify-lb, failover, rolling update, scale"
task verify-lb -- --check
task failover
task simulate-rolling-update
task scale REPLICAS=1
task scale REPLICAS=0
unset DISCOVERY

step "task down leaves nothing behind"
task down
left=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
nets=$(docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
[ -z "$left$nets$vols" ] || fail "left behind: containers [$left] networks [$nets] volumes [$vols]"
echo "clean"
trap - EXIT
echo
echo "E2E PASSED"
