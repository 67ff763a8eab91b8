#!/usr/bin/env bash
# Builds the pinned upstream components of the local test world from their Go
# modules (e2e/tools/*/go.mod, hashes pinned by the committed go.sum files) and
# caches the binaries outside the checkout, keyed by component version and
# go.sum hash. A second run reuses them; a fresh machine builds them unattended.
#
# Usage: e2e/tools/build.sh [etcd|kube|kwok|helm|gie|epp ...]   (default: all)
# Prints the directory holding the binaries on its last line of stdout.
# `gie` builds nothing: it copies the Gateway API Inference Extension's
# InferencePool CRD (inference.networking.k8s.io_inferencepools.yaml) from its
# Go module (downloaded and checked against e2e/tools/gie/go.sum) into the
# same directory. `epp` builds that extension's endpoint picker (cmd/epp) at
# the same version.
# A component's patches (e2e/tools/<component>/patches/*.patch, each saying
# why) are applied to a copy of its module, checked against go.sum first, and
# the build replaces the module with that copy. Only fixes to upstream bugs
# that make the local world unlike a real cluster belong there.
# Cache root: $STRATA_CACHE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/strata.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${STRATA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/strata}"
bin_dir="$cache_root/bin"
mkdir -p "$bin_dir"

log() { printf '[strata-tools] %s\n' "$*" >&2; }

# The key covers the pinned modules, their patches and this script (its
# -ldflags). Contents only (not paths), so that every checkout on a machine
# shares the cache.
sum_key() {
  { cat "$here/$1/go.mod" "$here/$1/go.sum" "$here/build.sh"; patches_of "$1"; } \
    | sha256sum | cut -c1-12
}
patches_of() {
  local p
  for p in "$here/$1"/patches/*.patch; do if [[ -f "$p" ]]; then cat "$p"; fi; done
}

# module_dir <component> <module>: the module's source in the module cache,
# downloaded if needed; -mod=readonly: its hash must be the one go.sum pins.
module_dir() {
  (cd "$here/$1" && GOFLAGS=-mod=readonly go mod download -json "$2" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
}

# patched_modfile <component> <module> <dir>: copies the module into <dir>/src,
# applies the component's patches and writes <dir>/go.mod (+ go.sum) replacing
# the module with the copy. Prints the go.mod's path.
patched_modfile() {
  local comp="$1" module="$2" work="$3" src p
  src="$(module_dir "$comp" "$module")"
  [[ -n "$src" && -d "$src" ]] || { log "$comp: $module not downloaded"; exit 1; }
  cp -r "$src" "$work/src"
  chmod -R u+w "$work/src"
  for p in "$here/$comp"/patches/*.patch; do
    log "$comp: applying $(basename "$p")"
    # Outside any repository: git apply works on plain directories.
    (cd "$work/src" && GIT_CEILING_DIRECTORIES="$work" git apply -p1 "$p")
  done
  cp "$here/$comp/go.mod" "$work/go.mod"
  cp "$here/$comp/go.sum" "$work/go.sum"
  printf '\nreplace %s => %s\n' "$module" "$work/src" >>"$work/go.mod"
  echo "$work/go.mod"
}

# build <component> <version> <binaries...> -- <go build args...>
build() {
  local comp="$1" version="$2"; shift 2
  local bins=()
  while [[ "$1" != "--" ]]; do bins+=("$1"); shift; done
  shift
  local key dest
  key="$(sum_key "$comp")"
  dest="$bin_dir/$comp-$version-$key"
  local missing=0
  for b in "${bins[@]}"; do [[ -x "$dest/$b" ]] || missing=1; done
  if [[ $missing -eq 0 ]]; then
    log "$comp $version: cached in $dest"
  else
    log "$comp $version: building (this takes a while on a cold machine)"
    local start tmp modfile=()
    start=$(date +%s)
    tmp="$(mktemp -d "$bin_dir/.build-$comp-XXXXXX")"
    if [[ -n "$(patches_of "$comp")" ]]; then
      [[ -n "${PATCHED_MODULE:-}" ]] || { log "$comp has patches but names no module"; exit 2; }
      mkdir -p "$tmp/patched"
      modfile=("-modfile=$(patched_modfile "$comp" "$PATCHED_MODULE" "$tmp/patched")")
    fi
    (cd "$here/$comp" && CGO_ENABLED=0 go build -trimpath "${modfile[@]}" -o "$tmp/" "$@")
    rm -rf "$tmp/patched"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    log "$comp $version: built in $(( $(date +%s) - start ))s"
  fi
  for b in "${bins[@]}"; do ln -sf "$dest/$b" "$bin_dir/$b"; done
  # Older builds of this component (other versions or keys) are no longer used.
  for old in "$bin_dir/$comp"-*; do
    if [[ "$old" != "$dest" && -d "$old" ]]; then rm -rf "$old"; fi
  done
}

# fetch_file <component> <version> <module> <path in the module>: a file of a
# pinned module's source, cached like a binary and linked into $bin_dir.
fetch_file() {
  local comp="$1" version="$2" module="$3" path="$4"
  local file key dest
  file="$(basename "$path")"
  if ! grep -q "^require $module $version\$" "$here/$comp/go.mod"; then
    log "$comp: e2e/tools/$comp/go.mod does not require $module $version (versions.env)"
    exit 2
  fi
  key="$(sum_key "$comp")"
  dest="$bin_dir/$comp-$version-$key"
  if [[ -f "$dest/$file" ]]; then
    log "$comp $version: cached in $dest"
  else
    log "$comp $version: fetching $module"
    local dir tmp
    # -mod=readonly: the module's hash must be the one go.sum pins.
    dir="$(module_dir "$comp" "$module")"
    if [[ -z "$dir" || ! -f "$dir/$path" ]]; then
      log "$comp $version: $path not found in $module (${dir:-not downloaded})"
      exit 1
    fi
    tmp="$(mktemp -d "$bin_dir/.fetch-$comp-XXXXXX")"
    cp "$dir/$path" "$tmp/$file"
    chmod 0644 "$tmp/$file"
    rm -rf "$dest"
    mv "$tmp" "$dest"
  fi
  ln -sf "$dest/$file" "$bin_dir/$file"
  for old in "$bin_dir/$comp"-*; do
    if [[ "$old" != "$dest" && -d "$old" ]]; then rm -rf "$old"; fi
  done
}

k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

# Helm's offline default Kubernetes version (helm template, helm lint): ours.
helm_k8s=""
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_k8s+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done

components=("$@")
[[ ${#components[@]} -eq 0 ]] && components=(etcd kube kwok helm gie epp)
for c in "${components[@]}"; do
  case "$c" in
    etcd) build etcd "$ETCD_VERSION" etcd -- -ldflags "-s -w" . ;;
    kube) build kube "$K8S_VERSION" kube-apiserver kube-controller-manager kube-scheduler kubectl -- \
            -ldflags "-s -w $k8s_ldflags" \
            k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
            k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl ;;
    kwok) PATCHED_MODULE=sigs.k8s.io/kwok build kwok "$KWOK_VERSION" kwok -- \
            -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" sigs.k8s.io/kwok/cmd/kwok ;;
    helm) build helm "$HELM_VERSION" helm -- \
            -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION $helm_k8s" helm.sh/helm/v3/cmd/helm ;;
    gie) fetch_file gie "$GIE_VERSION" sigs.k8s.io/gateway-api-inference-extension \
            config/crd/bases/inference.networking.k8s.io_inferencepools.yaml ;;
    epp) if ! grep -q "^require sigs.k8s.io/gateway-api-inference-extension $GIE_VERSION\$" "$here/epp/go.mod"; then
           log "epp: e2e/tools/epp/go.mod does not require the extension at $GIE_VERSION (versions.env)"; exit 2
         fi
         build epp "$GIE_VERSION" epp -- -ldflags "-s -w" sigs.k8s.io/gateway-api-inference-extension/cmd/epp ;;
    *) log "unknown component $c"; exit 2 ;;
  esac
done
echo "$bin_dir"
