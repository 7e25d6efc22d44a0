#!/usr/bin/env bash
# The sandbox's moving parts, called by Taskfile.yml: preflight checks, image builds,
# health waits, and the scenarios (rolling update, failover, scale). Works with both
# `docker compose` (v2) and `docker-compose` (v1).
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-lbsandbox}
PROXY_PORT=${PROXY_PORT:-50050}
CLIENT=${CLIENT:-dist/client}
TARGET_TRIPLE=x86_64-unknown-linux-gnu
BINS=(server proxy client slice-api)

# DISCOVERY=kubernetes: the proxies watch EndpointSlices served by slice-api (a
# stand-in for the API server) instead of resolving DNS; every task works either way.
DISCOVERY=${DISCOVERY:-dns}
case $DISCOVERY in
  dns) ;;
  kubernetes) export COMPOSE_FILE=docker-compose.yml:docker-compose.kubernetes.yml ;;
  *) echo "error: DISCOVERY must be dns or kubernetes, got '$DISCOVERY'" >&2; exit 1 ;;
esac

die() { echo "$*" >&2; exit 1; }
say() { printf '\n== %s\n' "$*"; }

dc() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose "$@"
  else
    die "error: neither 'docker compose' nor 'docker-compose' is installed"
  fi
}

need_docker() {
  docker info >/dev/null 2>&1 || die "error: Docker is not running or not reachable (docker info failed)"
}

# The port must be free, or already ours.
need_port() {
  local port=$1 ours
  ours=$(docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --filter "publish=$port")
  if [ -z "$ours" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "error: port $port is taken by another process (set PROXY_PORT to use another)"
  fi
}

build() {
  echo "building static binaries (cargo, $TARGET_TRIPLE)..."
  local packages=()
  for bin in "${BINS[@]}"; do packages+=(-p "$bin"); done
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$TARGET_TRIPLE" "${packages[@]}" \
    || die "error: the build failed (cargo build), see above"
  mkdir -p dist
  # Wherever cargo put them: CARGO_TARGET_DIR or build.target-dir may move target/.
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') \
    || die "error: cargo metadata could not say where the binaries are"
  for bin in "${BINS[@]}"; do
    cp "$target_dir/$TARGET_TRIPLE/release/$bin" "dist/$bin"
  done
  local log
  log=$(mktemp)
  for bin in "${BINS[@]}"; do
    if ! docker build -q --build-arg "BIN=$bin" -t "lb-sandbox/$bin:latest" . >"$log" 2>&1; then
      cat "$log" >&2
      rm -f "$log"
      die "error: docker build of lb-sandbox/$bin failed"
    fi
  done
  rm -f "$log"
  docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' 'lb-sandbox/*'
}

# Waits until every running container of the services given (default: all) is healthy.
wait_healthy() {
  local deadline=$((SECONDS + ${WAIT_SECONDS:-60})) ids id status pending
  while :; do
    ids=$(dc ps -q "$@")
    pending=""
    for id in $ids; do
      status=$(docker inspect -f '{{.State.Status}}/{{.State.ExitCode}}/{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
      case "$status" in
        running/*/healthy | exited/0/none) ;; # healthy, or a one-shot that succeeded
        *) pending="$pending $(docker inspect -f '{{.Name}}' "$id" | tr -d /)=$status" ;;
      esac
    done
    [ -z "$pending" ] && [ -n "$ids" ] && return 0
    [ $SECONDS -ge $deadline ] && die "error: not healthy after ${WAIT_SECONDS:-60}s:$pending"
    sleep 0.2
  done
}

# What `task up` checks before building: Docker answers and the ports are free.
preflight() {
  need_docker
  need_port "$PROXY_PORT"
  need_port "${PROXY_B_PORT:-50060}"
  need_port "${PROXY_ADMIN_PORT:-9901}"
  need_port "${PROXY_B_ADMIN_PORT:-9902}"
}

up() {
  preflight
  local started=$SECONDS
  dc up -d --remove-orphans
  wait_healthy
  # The CA, for calling the HTTP/3 front from this machine (client --http3).
  mkdir -p certs
  docker cp "$(dc ps -q proxy):/certs/ca.pem" certs/ca.pem >/dev/null
  echo "sandbox healthy in $((SECONDS - started))s (upstream protocol: ${UPSTREAM_PROTOCOL:-h2}, relay: ${RELAY:-auto}, discovery: $DISCOVERY):"
  replicas | sed 's/^/  replica /'
  cat <<MSG

Call it:
  grpcurl -plaintext -d '{"name":"World"}' localhost:$PROXY_PORT hello.HelloService/SayHello
  dist/client --http3 --ca-cert certs/ca.pem hello        # the same over HTTP/3
  task verify-lb
  task simulate-rolling-update
  curl -s localhost:${PROXY_ADMIN_PORT:-9901}/admin/endpoints   # each replica's state and counts (node-b: 9902)
  curl -s localhost:${PROXY_ADMIN_PORT:-9901}/metrics
MSG
}

# Every running replica as NAME@NODE (the name replies carry is the hostname).
replicas() {
  local ids
  ids=$(docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --filter "ancestor=lb-sandbox/server:latest")
  [ -n "$ids" ] || return 0
  docker inspect -f '{{.Config.Hostname}}@{{index .Config.Labels "sandbox.node"}}' $ids | sort
}

expect_flag() {
  replicas | paste -sd, -
}

verify_lb() {
  "$CLIENT" --proxy "localhost:$PROXY_PORT" verify-lb --calls "${CALLS:-300}" --local-node node-a --expect "$(expect_flag)" "$@"
}

verify_lb_direct() {
  dc run --rm --no-deps client --target server:50051 --local-target node-a.server:50051 \
    verify-lb --calls "${CALLS:-300}" --local-node node-a --expect "$(expect_flag)" "$@"
}

container_ip() {
  docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(dc ps -q "$1")"
}

# Runs load and a stream in the background until the scenario calls stop_traffic.
start_traffic() {
  WORK=$(mktemp -d)
  echo "steady" >"$WORK/phase"
  "$CLIENT" --proxy "localhost:$PROXY_PORT" load --rate "${RATE:-200}" --duration 1h --concurrency 64 \
    --phases "$WORK/phase" --quiet --allow-failures >"$WORK/load.out" 2>"$WORK/load.err" &
  LOAD_PID=$!
  "$CLIENT" --proxy "localhost:$PROXY_PORT" stream --interval-ms 50 --quiet >"$WORK/stream.out" 2>"$WORK/stream.err" &
  STREAM_PID=$!
  trap 'kill $LOAD_PID $STREAM_PID 2>/dev/null || true' EXIT
}

phase() {
  echo "$*" >"$WORK/phase"
  printf '  %-28s %s\n' "$*" "$(date +%T)"
}

stop_traffic() {
  kill -INT "$LOAD_PID" "$STREAM_PID"
  local load_rc=0 stream_rc=0
  wait "$LOAD_PID" || load_rc=$?
  wait "$STREAM_PID" || stream_rc=$?
  trap - EXIT
  say "load through the proxy (${RATE:-200} calls/s)"
  cat "$WORK/load.out"
  say "stream (re-opened with resume_after after each break)"
  cat "$WORK/stream.out"
  grep -v '^$' "$WORK/stream.err" | sed 's/^/  /' || true
  local failed
  failed=$(sed -n 's/^  ok [0-9]*, failed \([0-9]*\)$/\1/p' "$WORK/load.out")
  rm -rf "$WORK"
  if [ "${failed:-1}" != 0 ] || [ "$load_rc" != 0 ] || [ "$stream_rc" != 0 ]; then
    die "FAILED: ${failed:-?} failed calls (load exit $load_rc), stream exit $stream_rc"
  fi
  echo
  echo "PASSED: 0 failed calls, stream with 0 gaps and 0 duplicates"
}

rolling_update() {
  need_docker
  wait_healthy proxy
  say "rolling update under load: SIGTERM each replica, start it again; recreate server2 (new IP)"
  start_traffic
  sleep 3
  for s in server1 server2 server3; do
    phase "stop $s"
    dc stop -t 15 "$s" >/dev/null 2>&1
    phase "$s down"
    sleep 3
    phase "start $s"
    dc start "$s" >/dev/null 2>&1
    wait_healthy "$s"
    sleep 2
  done
  local before after holder=${COMPOSE_PROJECT_NAME}_ipholder
  before=$(container_ip server2)
  phase "recreate server2"
  dc stop -t 15 server2 >/dev/null 2>&1
  dc rm -f server2 >/dev/null 2>&1
  # Docker would hand the freed IP straight back; hold it so server2 moves, as a
  # rescheduled pod would. The holder has no alias, so no DNS name finds it.
  docker run -d --rm --name "$holder" --network "${COMPOSE_PROJECT_NAME}_cluster" \
    --label "com.docker.compose.project=$COMPOSE_PROJECT_NAME" lb-sandbox/server:latest --name ipholder >/dev/null
  dc up -d --no-deps server2 >/dev/null 2>&1
  docker rm -f "$holder" >/dev/null
  wait_healthy server2
  after=$(container_ip server2)
  sleep 2
  phase "steady again"
  sleep 3
  echo "  server2 IP: $before -> $after"
  stop_traffic
}

failover() {
  need_docker
  wait_healthy proxy
  say "failover: stop both node-a replicas, calls move to node-b, then come back"
  start_traffic
  # node-a's proxy's own account of the failover and failback, for the timeline.
  curl -sN "localhost:${PROXY_ADMIN_PORT:-9901}/admin/events" >"$WORK/events" 2>/dev/null &
  EVENTS_PID=$!
  trap 'kill $LOAD_PID $STREAM_PID $EVENTS_PID 2>/dev/null || true' EXIT
  local since timeline
  sleep 3
  phase "kill server1+server2"
  dc kill -s SIGKILL server1 server2 >/dev/null 2>&1
  sleep 4
  phase "start server1+server2"
  since=$(date +%s.%N)
  dc start server1 server2 >/dev/null 2>&1
  wait_healthy server1 server2
  sleep 3
  phase "back on node-a"
  sleep 3
  kill "$EVENTS_PID" 2>/dev/null || true
  timeline=$(failover_timeline "$since") || timeline="  (no timeline: see the error above)"
  stop_traffic
  say "timeline (node-a's proxy's /admin/events, the replicas' logs)"
  echo "$timeline"
}

# The failover's timeline: node-a's proxy's events against Docker's times (when each
# replica died and started again) and the replicas' logs since SINCE.
failover_timeline() {
  local since=$1 ids
  ids=$(dc ps -q server1 server2)
  # shellcheck disable=SC2086 # one container id per word
  for id in $ids; do docker logs --timestamps --since "$since" "$id" 2>&1; done >"$WORK/logs"
  # shellcheck disable=SC2086
  python3 scripts/timeline.py "$WORK/events" \
    "$(docker inspect -f '{{.State.FinishedAt}}' $ids | paste -sd,)" \
    "$(docker inspect -f '{{.State.StartedAt}}' $ids | paste -sd,)" "$WORK/logs"
}

# Extra node-a replicas (server4, server5, ...): `task scale` adds or removes them so
# that REPLICAS run, each named like the others.
scale() {
  need_docker
  local n=${REPLICAS:-2} have i name
  [[ $n =~ ^[0-9]+$ ]] || die "error: REPLICAS must be a number of extra replicas, got '$n'"
  mapfile -t have < <(docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter label=sandbox.scaled --format '{{.Label "sandbox.scaled"}}' | sort -V)
  say "scale: $n extra replica(s) on node-a (${#have[@]} before)"
  for ((i = ${#have[@]}; i < n; i++)); do
    name="server$((4 + i))"
    SCALED=$name extra_replica "$name"
  done
  for ((i = ${#have[@]} - 1; i >= n; i--)); do
    docker rm -f "${COMPOSE_PROJECT_NAME}_${have[i]}" >/dev/null
  done
  local deadline=$((SECONDS + 30))
  for ((i = 0; i < n; i++)); do
    name="${COMPOSE_PROJECT_NAME}_server$((4 + i))"
    # The image has no shell for a --health-cmd: ask its own health check.
    until docker exec "$name" /app health-check >/dev/null 2>&1; do
      [ $SECONDS -ge $deadline ] && die "error: $name not healthy after 30s"
      sleep 0.2
    done
  done
  sleep 1
  echo "replicas now:"; replicas | sed 's/^/  /'
  echo "calls 1 s after they became healthy:"
  verify_lb "$@"
  echo "(scale back with: task scale REPLICAS=0)"
}

lint_docker() {
  local image=${LINT_IMAGE:-rust:1}
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    echo "lint:docker: no local image $image with cargo (no registry to pull from); run 'task lint' instead"
    return 0
  fi
  docker run --rm -v "$PWD:/src" -w /src "$image" \
    sh -c 'cargo fmt --all -- --check && cargo clippy --all-targets -- -D warnings'
}

# An extra node-a replica outside compose: `extra_replica NAME ENV=VALUE...`
# (SCALED=NAME labels it as one of `task scale`'s).
extra_replica() {
  local name=$1
  shift
  local envs=()
  for e in "$@"; do envs+=(-e "$e"); done
  local scaled=()
  [ -n "${SCALED:-}" ] && scaled=(--label "sandbox.scaled=$SCALED")
  docker run -d --rm --name "${COMPOSE_PROJECT_NAME}_$name" --hostname "$name" \
    --network "${COMPOSE_PROJECT_NAME}_cluster" --network-alias server --network-alias node-a.server \
    --label "com.docker.compose.project=$COMPOSE_PROJECT_NAME" --label sandbox.node=node-a "${scaled[@]}" \
    -v "${COMPOSE_PROJECT_NAME}_certs:/certs:ro" -e SERVER_NODE=node-a "${envs[@]}" lb-sandbox/server:latest \
    --tls-cert /certs/cert.pem --tls-key /certs/key.pem >/dev/null
}

# An extra node-a proxy on PORT with an optional service config file and ENV=VALUE
# settings: `extra_proxy NAME PORT [CONFIG [ENV=VALUE...]]`.
extra_proxy() {
  local name=$1 port=$2 config=${3:-}
  shift 3 2>/dev/null || shift $#
  local args=()
  [ -n "$config" ] && args=(-v "$PWD/$config:/etc/lb/config.json:ro" -e PROXY_SERVICE_CONFIG=/etc/lb/config.json)
  for e in "$@"; do args+=(-e "$e"); done
  docker run -d --rm --name "${COMPOSE_PROJECT_NAME}_$name" --network "${COMPOSE_PROJECT_NAME}_cluster" \
    --label "com.docker.compose.project=$COMPOSE_PROJECT_NAME" -p "$port:50050" \
    -v "${COMPOSE_PROJECT_NAME}_certs:/certs:ro" -e PROXY_CA_CERT=/certs/ca.pem \
    -e PROXY_UPSTREAM_PROTOCOL="${UPSTREAM_PROTOCOL:-h2}" \
    -e PROXY_LOCAL_TARGET=node-a.server:50051 "${args[@]}" lb-sandbox/proxy:latest >/dev/null
  local deadline=$((SECONDS + 30))
  until "$CLIENT" --proxy "localhost:$port" --timeout 1s hello >/dev/null 2>&1; do
    [ $SECONDS -ge $deadline ] && die "error: proxy $name on :$port not answering"
    sleep 0.2
  done
}

remove_extras() {
  docker rm -f "$@" >/dev/null 2>&1 || true
}

# Runs the same load through two proxies, then prints their summaries side by side.
compare() {
  local label_a=$1 port_a=$2 label_b=$3 port_b=$4 check=${5:-} out
  out=$(mktemp -d)
  for side in a b; do
    local port label
    if [ $side = a ]; then port=$port_a label=$label_a; else port=$port_b label=$label_b; fi
    echo "  load through $label (:$port) at ${RATE:-200}/s for ${DURATION:-10s}..."
    "$CLIENT" --proxy "localhost:$port" load --rate "${RATE:-200}" --duration "${DURATION:-10s}" \
      --json --allow-failures --quiet >"$out/$side.json"
  done
  local rc=0
  python3 scripts/compare.py "$label_a" "$out/a.json" "$label_b" "$out/b.json" $check || rc=$?
  rm -rf "$out"
  return $rc
}

demo_retry() {
  need_docker
  wait_healthy proxy
  say "retry: a third node-a replica fails 30% of calls with UNAVAILABLE"
  trap "remove_extras ${COMPOSE_PROJECT_NAME}_flaky ${COMPOSE_PROJECT_NAME}_proxy-noretry" EXIT
  extra_replica flaky SERVER_FAIL_RATE=0.3 SERVER_FAIL_CODE=UNAVAILABLE
  extra_proxy proxy-noretry 50070
  sleep 2
  compare "no policy" 50070 "retry policy" "$PROXY_PORT" retry
}

demo_hedging() {
  need_docker
  wait_healthy proxy
  say "hedging: a third node-a replica answers 200 ms late"
  trap "remove_extras ${COMPOSE_PROJECT_NAME}_slow ${COMPOSE_PROJECT_NAME}_proxy-hedging" EXIT
  extra_replica slow SERVER_DELAY_MS=200
  extra_proxy proxy-hedging 50071 config/hedging.json
  sleep 2
  compare "retry only" "$PROXY_PORT" "hedging 20 ms" 50071 hedging
}

demo_outlier() {
  need_docker
  wait_healthy proxy
  say "outlier detection and health checking: a failing, a hung and a NOT_SERVING node-a replica"
  trap "remove_extras ${COMPOSE_PROJECT_NAME}_proxy-plain ${COMPOSE_PROJECT_NAME}_proxy-detect ${COMPOSE_PROJECT_NAME}_failing ${COMPOSE_PROJECT_NAME}_hung ${COMPOSE_PROJECT_NAME}_sick" EXIT
  # Without: no service config (no health check, no ejection) and a 5-minute keepalive.
  extra_proxy proxy-plain 50072 "" PROXY_KEEPALIVE_INTERVAL=300s
  # With: config/outlier.json (health check, ejection after 5 failures) and the 1 s keepalive.
  extra_proxy proxy-detect 50073 config/outlier.json
  python3 scripts/demo_outlier.py "$COMPOSE_PROJECT_NAME" "$CLIENT" "${RATE:-100}" "${SCENARIOS:-failing,hung,sick}" "$PROXY_PORT"
}

down() {
  if ! docker info >/dev/null 2>&1; then
    echo "Docker is not running; nothing to stop"
    return 0
  fi
  # Whichever way it was started: slice-api is removed as a service, not an orphan.
  export COMPOSE_FILE=docker-compose.yml:docker-compose.kubernetes.yml
  # Replicas started outside compose (task scale, the demos) go first: the network
  # cannot be removed while they are attached.
  local extras
  extras=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --filter label=sandbox.node)
  [ -n "$extras" ] && docker rm -f $extras >/dev/null 2>&1
  dc --profile tools down --remove-orphans --volumes --timeout 15
}

cmd=${1:?usage: sandbox.sh COMMAND}
shift
"$cmd" "$@"
