# shellcheck shell=bash
# Shared by scripts/images and scripts/release: the names of the images, the
# versions they must carry, and the tools they need. Sourced, not run.
#
# The caller sets `root` (the checkout) before sourcing.

# Where the product images are published (the chart's defaults).
STRATA_REGISTRY="ghcr.io/strata-ai"
# The images users get, and the test-only ones (never released).
PRODUCT_IMAGES=(strata-operator strata-sidecar strata-node-agent strata-gateway)
TEST_IMAGES=(strata-engine-sim)

# shellcheck disable=SC2034 # used by the scripts that source this file
images_dir="${STRATA_IMAGES_DIR:-$root/target/images}"
# One OCI image layout holding every image, each under its full reference
# (annotation org.opencontainers.image.ref.name in index.json).
# shellcheck disable=SC2034
layout="$images_dir/oci"
# shellcheck disable=SC2034
cache_root="${STRATA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/strata}"

log() { printf '[strata-images] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_test_image() {
  local t
  for t in "${TEST_IMAGES[@]}"; do [[ "$1" == "$t" ]] && return 0; done
  return 1
}

known_image() {
  local i
  for i in "${PRODUCT_IMAGES[@]}" "${TEST_IMAGES[@]}"; do [[ "$1" == "$i" ]] && return 0; done
  return 1
}

# image_ref IMAGE VERSION: the reference an image is stored under (and, for
# product images, pulled by the chart). Test images live under localhost/ so
# that they cannot be pushed by mistake to the product's registry.
image_ref() {
  if is_test_image "$1"; then
    printf 'localhost/%s:%s\n' "$1" "$2"
  else
    printf '%s/%s:%s\n' "$STRATA_REGISTRY" "$1" "$2"
  fi
}

# apt_install PKG...: installs Debian packages, as root or through sudo,
# refreshing the package lists only when the first attempt fails.
apt_install() {
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 ||
      die "needs the Debian packages: $*; install them as root: apt-get install -y --no-install-recommends $*"
    sudo=(sudo)
  fi
  log "installing Debian packages: $*"
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; then
    "${sudo[@]}" apt-get update >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
  fi
}

# apt_update: refreshes apt's package lists (as root or through sudo).
apt_update() {
  local sudo=()
  [[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
  log "apt-get update"
  "${sudo[@]}" apt-get update >&2
}

# need COMMAND:PACKAGE...: installs the packages whose command is missing.
need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then apt_install "${missing[@]}"; fi
}

# workspace_versions: "name version" of every workspace crate.
workspace_versions() {
  need jq:jq
  (cd "$root" && cargo metadata --no-deps --format-version 1 --locked) |
    jq -r '.packages[] | "\(.name) \(.version)"' | sort
}

# crate_version: the workspace's version (strata-operator's), after checking
# that every crate of the workspace has it.
crate_version() {
  local versions v
  versions="$(workspace_versions)"
  v="$(awk '$1 == "strata-operator" {print $2}' <<<"$versions")"
  [[ -n "$v" ]] || die "cargo metadata lists no strata-operator crate"
  if awk -v v="$v" '$2 != v {bad = 1} END {exit !bad}' <<<"$versions"; then
    die "the workspace's crates disagree on their version (all must be $v, as strata-operator):
$versions"
  fi
  printf '%s\n' "$v"
}

# chart_field FIELD: a top-level scalar of charts/strata/Chart.yaml.
chart_field() {
  sed -n "s/^$1:[[:space:]]*//p" "$root/charts/strata/Chart.yaml" | sed 's/[[:space:]]*#.*$//; s/^"\(.*\)"$/\1/; s/^'"'"'\(.*\)'"'"'$/\1/'
}

# git_revision: the commit the images are built from; "-dirty" when tracked
# files differ from it.
git_revision() {
  local rev
  rev="$(git -C "$root" rev-parse HEAD 2>/dev/null)" || { echo unknown; return; }
  if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    rev+="-dirty"
  fi
  printf '%s\n' "$rev"
}

# source_date_epoch: $SOURCE_DATE_EPOCH, else the commit's time: every
# timestamp in the images (files, config, history, labels) is this one.
source_date_epoch() {
  if [[ -n "${SOURCE_DATE_EPOCH:-}" ]]; then
    printf '%s\n' "$SOURCE_DATE_EPOCH"
  else
    git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0
  fi
}

# helm_bin: the project's Helm (e2e/tools/build.sh, cached under
# ~/.cache/strata/bin; $STRATA_BIN_DIR when scripts/test already found it).
helm_bin() {
  local dir="${STRATA_BIN_DIR:-}"
  if [[ -z "$dir" || ! -x "$dir/helm" ]]; then
    dir="$("$root/e2e/tools/build.sh" helm | tail -n 1)"
  fi
  [[ -x "$dir/helm" ]] || die "no helm in $dir (e2e/tools/build.sh helm)"
  printf '%s\n' "$dir/helm"
}
