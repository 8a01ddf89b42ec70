#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine, as root: Debian packages, the
# virtualenv with pinned dependencies, Debian's BCC made importable in it,
# kernel header links for the running kernel, and bpffs. Quick when done.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$here/.venv"
say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs Debian packages and mounts bpffs): sudo $0"

# 1. Debian packages. BCC comes from Debian (python3-bpfcc); PyPI's "bcc" is an
#    unrelated project. iptables/nftables are only read by the tests, to prove
#    that nodemesh installs no rule; haproxy, iperf3, wrk, nginx, sockperf and
#    nghttp2 are the benchmark peers and the tests' real clients and servers.
pkgs=(python3 python3-venv python3-bpfcc bpftool linux-headers-amd64 iproute2
      curl iptables nftables procps psmisc haproxy iperf3 wrk nginx sockperf
      nghttp2-client nghttp2-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # nginx, haproxy and the like are benchmark peers the run starts itself in
  # sandbox pods: their packages must not start host-wide services.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    guard=/usr/sbin/policy-rc.d
  fi
  trap '[ -n "$guard" ] && rm -f "$guard"' EXIT
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  [ -n "$guard" ] && rm -f "$guard"
  guard=""
fi

# 2. Kernel headers: BCC compiles against /lib/modules/$(uname -r)/build. The
#    running kernel ships none, so point the links at Debian's headers.
kver=$(uname -r)
mod="/lib/modules/$kver"
if [ ! -e "$mod/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || die "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64"
  common="${hdr%-amd64}-common"
  say "linking kernel headers for $kver -> $hdr"
  mkdir -p "$mod"
  ln -sfn "$hdr" "$mod/build"
  [ -d "$common" ] && ln -sfn "$common" "$mod/source"
fi

# 3. bpffs, for the pinned maps.
if ! awk '$2=="/sys/fs/bpf" && $3=="bpf" {found=1} END {exit !found}' /proc/mounts; then
  say "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# 4. The virtualenv, on Debian's Python 3.11 (the interpreter python3-bpfcc is
#    built for), with pinned dependencies.
req="$here/requirements.lock"
stamp="$venv/.nodemesh-installed"
want=$(cat "$req" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  /usr/bin/python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing Python dependencies (pinned in requirements.lock)"
  # (grep drops pip's warnings about find-links folders this machine lacks)
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$here" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -c 'import uvloop, aiohttp, pyroute2, yaml, pytest' \
    || die "Python dependencies did not install into $venv (see pip's output above)"
  echo "$want" > "$stamp"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Only BCC, not all of Debian's dist-packages, so that nothing shadows the pins.
if [ ! -e "$site/bcc" ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"  # -f: replaces a dangling link
fi
"$venv/bin/python" -c 'import bcc' 2>/dev/null || die "bcc is not importable from $venv: is python3-bpfcc installed?"
say "ready ($venv)"
