#!/usr/bin/env bash
# Pull time of a multi-layer image from a local registry (Debian's docker-registry on
# 127.0.0.1), same image, same run, rounds interleaved, each into an empty store:
#   strata pull                       (download + verify + unpack into layer snapshots)
#   skopeo copy to an OCI dir + umoci unpack   (the same two steps with the image tools)
#   ctr image pull --plain-http       (a private containerd, its overlayfs snapshotter)
# Prints median (min-max) seconds and the ratios. Run as root, after
#   cargo build --release -p strata-runtime
# Usage: bash benches/pull-vs-peers.sh [N]   (default 3)
set -euo pipefail
N=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
strata="${STRATA_BIN:-$here/target/release/strata}"
[ -x "$strata" ] || { echo "build it first: cargo build --release -p strata-runtime" >&2; exit 1; }
for c in umoci skopeo containerd ctr docker-registry busybox; do
  command -v "$c" >/dev/null || { echo "needs $c (scripts/test-all.sh installs it)" >&2; exit 1; }
done
d=$(mktemp -d /var/tmp/pullbench-XXXX)
cleanup() {
  for p in "$d"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null; done
  sleep 1
  umount -R "$d" 2>/dev/null || true
  rm -rf "$d"
}
trap cleanup EXIT

# The image: three layers from files on this machine (~170 MB unpacked): busybox and Python's
# standard library (many small files), the documentation tree, a slice of /usr/bin.
L=$d/layout B=$d/bundle
umoci init --layout "$L" && umoci new --image "$L:latest"
layer() { # populate-command
  rm -rf "$B"; umoci unpack --image "$L:latest" "$B" >/dev/null
  (cd "$B/rootfs" && eval "$1")
  umoci repack --image "$L:latest" "$B" >/dev/null
}
layer 'mkdir -p bin usr/lib && cp "$(command -v busybox)" bin/ && ln -s busybox bin/sh && cp -a /usr/lib/python3 usr/lib/'
layer 'mkdir -p usr/share && cp -a /usr/share/doc usr/share/'
layer 'mkdir -p usr/bin && { ls -S /usr/bin || true; } | head -40 | while read -r f; do if [ -f "/usr/bin/$f" ]; then cp "/usr/bin/$f" usr/bin/; fi; done'
umoci config --image "$L:latest" --config.cmd /bin/sh >/dev/null
tar -C "$L" -cf "$d/img.tar" .
size=$(du -sm "$L/blobs" | cut -f1)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$d/registry.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $d/registry
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$d/registry.yml" >"$d/registry.log" 2>&1 &
echo $! >"$d/registry.pid"
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
ref=127.0.0.1:$port/bench/img:v1
"$strata" --root "$d/src" load -q -i "$d/img.tar"
"$strata" --root "$d/src" tag localhost/img:latest "$ref"
"$strata" --root "$d/src" push -q "$ref" >/dev/null

. "$here/benches/containerd.sh"
stop_containerd() {
  kill "$(cat "$d/ctrd.pid")"; while kill -0 "$(cat "$d/ctrd.pid")" 2>/dev/null; do sleep 0.1; done
  umount -R "$d/ctrd" 2>/dev/null || true
  rm -rf "$d/ctrd" "$d/ctrd.pid"
}

ms() { local s e; s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(((e - s) / 1000000)); }
run_strata() { rm -rf "$d/s"; sync; ms "$strata" --root "$d/s" pull -q "$ref"; }
run_skopeo() {
  rm -rf "$d/oci" "$d/unpacked"; sync
  local s e; s=$(date +%s%N)
  skopeo copy --src-tls-verify=false "docker://$ref" "oci:$d/oci:v1" >/dev/null 2>&1
  umoci unpack --image "$d/oci:v1" "$d/unpacked" >/dev/null 2>&1
  e=$(date +%s%N); echo $(((e - s) / 1000000))
}
run_ctr() {
  start_containerd; sync
  ms ctr --address "$d/ctrd.sock" -n bench image pull --plain-http "$ref"
  stop_containerd
}
: >"$d/strata.t"; : >"$d/skopeo.t"; : >"$d/ctr.t"
order=(strata skopeo ctr)
for round in $(seq "$N"); do
  for i in 0 1 2; do
    k=${order[$(( (i + round) % 3 ))]}
    "run_$k" >>"$d/$k.t"
  done
done
stats() { sort -n "$1" | awk '{a[NR]=$1} END {printf "%.2f %.2f %.2f", a[int((NR+1)/2)]/1000, a[1]/1000, a[NR]/1000}'; }
read -r sm slo shi <<<"$(stats "$d/strata.t")"
read -r km klo khi <<<"$(stats "$d/skopeo.t")"
read -r cm clo chi <<<"$(stats "$d/ctr.t")"
echo "pull of a 3-layer image (${size} MB of blobs) from docker-registry on 127.0.0.1, $N interleaved rounds (s): median (min-max)"
echo "| | seconds | strata / this |"
echo "|---|---|---|"
awk -v v="$sm" -v lo="$slo" -v hi="$shi" 'BEGIN { printf "| strata pull | %s (%s-%s) | 1.00 |\n", v, lo, hi }'
awk -v v="$km" -v lo="$klo" -v hi="$khi" -v s="$sm" 'BEGIN { printf "| skopeo copy + umoci unpack | %s (%s-%s) | %.2f |\n", v, lo, hi, s / v }'
awk -v v="$cm" -v lo="$clo" -v hi="$chi" -v s="$sm" 'BEGIN { printf "| ctr image pull --plain-http (overlayfs) | %s (%s-%s) | %.2f |\n", v, lo, hi, s / v }'
