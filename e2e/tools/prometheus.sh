#!/usr/bin/env bash
# Provides a real Prometheus server for the tests of the autoscaler's
# Prometheus metrics source (e2e/tests/prometheus_source.rs) and of the
# Grafana dashboard's queries (e2e/tests/gitops.rs): Debian
# bookworm's package, pinned below, unpacked (not installed) into the cache.
# A second run reuses it. A cold cache needs apt-get, dpkg-deb and the Debian
# bookworm archive in the apt sources (apt checks the package against its
# signed index); nothing is installed system-wide.
#
# Usage: e2e/tools/prometheus.sh
# Prints the path of the prometheus binary on its last line of stdout.
# Cache root: $STRATA_CACHE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/strata.
set -euo pipefail

version="2.42.0+ds-5+deb12u1"
cache_root="${STRATA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/strata}"
dest="$cache_root/prometheus-$version"
bin="$dest/usr/bin/prometheus"

log() { printf '[strata-tools] %s\n' "$*" >&2; }
fail() {
  printf '[strata-tools] error: %s\n' "$*" >&2
  exit 1
}

if [[ -x "$bin" ]]; then
  log "prometheus $version: cached in $dest"
else
  command -v apt-get >/dev/null 2>&1 ||
    fail "apt-get is needed to fetch Debian's prometheus $version; or unpack the package so that $bin exists"
  command -v dpkg-deb >/dev/null 2>&1 || fail "dpkg-deb is needed to unpack prometheus $version"
  log "prometheus $version: downloading the Debian package"
  mkdir -p "$cache_root"
  tmp="$(mktemp -d "$cache_root/.prometheus-XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download writes into the current directory; it installs nothing.
  if ! (cd "$tmp" && apt-get download -q "prometheus=$version" >&2); then
    # A fresh machine may have empty package lists: refresh them once (as
    # root, or with sudo when it needs no password), then try again.
    log "refreshing the apt package lists"
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -q >&2 || true
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo -n apt-get update -q >&2 || true
    fi
    (cd "$tmp" && apt-get download -q "prometheus=$version" >&2) ||
      fail "apt-get download prometheus=$version failed (is the Debian bookworm archive in the apt sources?)"
  fi
  deb=("$tmp"/prometheus_*.deb)
  [[ -f "${deb[0]}" ]] || fail "apt-get download left no prometheus .deb in $tmp"
  mkdir -p "$tmp/root"
  dpkg-deb -x "${deb[0]}" "$tmp/root" || fail "dpkg-deb could not unpack ${deb[0]}"
  [[ -x "$tmp/root/usr/bin/prometheus" ]] || fail "the package has no usr/bin/prometheus"
  rm -rf "$dest"
  mv "$tmp/root" "$dest"
  log "prometheus $version: unpacked into $dest"
fi

# The binary must run here (Debian links it against libc only; this
# catches a missing shared library or a foreign architecture).
if ! out="$("$bin" --version 2>&1)"; then
  fail "$bin does not run: $out"
fi
log "$(printf '%s' "$out" | head -n 1)"
echo "$bin"
