#!/usr/bin/env bash
# A PNG of the proxy's live page once it has shown a few snapshots, for the README:
#   scripts/page_screenshot.sh http://localhost:9901/ page.png [seconds, default 3.5]
# Headless chromium (`apt-get install chromium`) driven over --remote-debugging-pipe:
# `--screenshot --virtual-time-budget` never fires on this page, because virtual time
# waits for pending fetches and the page's event stream never ends.
set -euo pipefail

url=${1:?usage: $0 URL OUT.png [SECONDS]}
out=${2:?usage: $0 URL OUT.png [SECONDS]}
wait=${3:-3.5}
width=${WIDTH:-1200}
height=${HEIGHT:-800}
chromium=${CHROMIUM:-/usr/bin/chromium}
[[ -x $chromium ]] || { echo "no $chromium: apt-get install chromium" >&2; exit 1; }

profile=$(mktemp -d)
log=$profile/chromium.log
trap 'rm -rf "$profile"' EXIT

# Chromium reads DevTools messages on fd 3 and writes them on fd 4, each ending in NUL.
coproc CDP {
  exec "$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$profile" --window-size="$width,$height" --remote-debugging-pipe \
    3<&0 4>&1 </dev/null >/dev/null 2>"$log"
}
exec {to}>&"${CDP[1]}" {from}<&"${CDP[0]}"

n=0
# call METHOD PARAMS [SESSION]: sends a command, prints its reply, skips events.
call() {
  n=$((n + 1))
  local session=${3:+,\"sessionId\":\"$3\"} msg
  printf '{"id":%d,"method":"%s","params":%s%s}\0' "$n" "$1" "$2" "$session" >&"$to"
  while IFS= read -r -d '' -t 20 msg <&"$from"; do
    if [[ $msg == "{\"id\":$n,"* ]]; then
      if [[ $msg == *'"error":'* ]]; then
        echo "$1 failed: $msg" >&2
        return 1
      fi
      printf '%s' "$msg"
      return 0
    fi
  done
  echo "no answer to $1 from chromium; its log:" >&2
  cat "$log" >&2
  return 1
}
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

target=$(call Target.createTarget "{\"url\":\"about:blank\"}" | field targetId)
session=$(call Target.attachToTarget "{\"targetId\":\"$target\",\"flatten\":true}" | field sessionId)
call Emulation.setDeviceMetricsOverride \
  "{\"width\":$width,\"height\":$height,\"deviceScaleFactor\":1,\"mobile\":false}" "$session" >/dev/null
call Page.navigate "{\"url\":\"$url\"}" "$session" >/dev/null
sleep "$wait"
call Page.captureScreenshot '{"format":"png"}' "$session" | field data | base64 -d >"$out"
call Browser.close '{}' >/dev/null || true
wait "$CDP_PID" 2>/dev/null || true
echo "$out: ${width}x$height, after ${wait}s of $url"
