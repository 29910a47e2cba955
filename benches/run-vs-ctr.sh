#!/usr/bin/env bash
# Container start+stop wall time: `strata run --rm IMAGE true` against `ctr run --rm` (a
# private containerd with its overlayfs snapshotter and runc) on the same image, interleaved.
# Prints median, min and max of N runs each and the ratio. Run as root, after
#   cargo build --release -p strata-runtime
# Usage: bash benches/run-vs-ctr.sh [N]   (default 20)
set -euo pipefail
N=${1:-20}
here=$(cd "$(dirname "$0")/.." && pwd)
strata="${STRATA_BIN:-$here/target/release/strata}"
[ -x "$strata" ] || { echo "build it first: cargo build --release -p strata-runtime" >&2; exit 1; }
for c in umoci containerd ctr runc busybox; do
  command -v "$c" >/dev/null || { echo "needs $c (scripts/test-all.sh installs it)" >&2; exit 1; }
done
d=$(mktemp -d /var/tmp/runbench-XXXX)
cleanup() {
  [ -f "$d/ctrd.pid" ] && kill "$(cat "$d/ctrd.pid")" 2>/dev/null || true
  sleep 1
  umount -R "$d" 2>/dev/null || true
  rm -rf "$d"
}
trap cleanup EXIT

# The image: busybox-static, built locally.
L=$d/layout B=$d/bundle
umoci init --layout "$L" && umoci new --image "$L:latest" && umoci unpack --image "$L:latest" "$B" >/dev/null
mkdir -p "$B/rootfs/bin"
cp "$(command -v busybox)" "$B/rootfs/bin/busybox"
for c in sh true; do ln -s busybox "$B/rootfs/bin/$c"; done
umoci repack --image "$L:latest" "$B" && umoci config --image "$L:latest" --config.cmd /bin/true
tar -C "$L" -cf "$d/img.tar" .

"$strata" --root "$d/strata" load -q -i "$d/img.tar"
. "$here/benches/containerd.sh"
start_containerd
ctr="ctr --address $d/ctrd.sock -n bench"
$ctr image import --base-name localhost/bench "$d/img.tar" >/dev/null

ms() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo $(((e - s) / 1000)); }
: >"$d/strata.t"; : >"$d/ctr.t"
for i in $(seq "$N"); do
  if ((i % 2)); then
    ms "$strata" --root "$d/strata" run --rm localhost/img:latest true >>"$d/strata.t"
    ms $ctr run --rm localhost/bench:latest "b$i" true >>"$d/ctr.t"
  else
    ms $ctr run --rm localhost/bench:latest "b$i" true >>"$d/ctr.t"
    ms "$strata" --root "$d/strata" run --rm localhost/img:latest true >>"$d/strata.t"
  fi
done
stats() { sort -n "$1" | awk '{a[NR]=$1} END {printf "%.1f %.1f %.1f", a[int((NR+1)/2)]/1000, a[1]/1000, a[NR]/1000}'; }
read -r sm slo shi <<<"$(stats "$d/strata.t")"
read -r cm clo chi <<<"$(stats "$d/ctr.t")"
echo "container run --rm IMAGE true, $N interleaved runs each (ms): median (min-max)"
echo "| | strata run --rm | ctr run --rm (containerd + runc) | ratio |"
echo "|---|---|---|---|"
awk -v sm="$sm" -v slo="$slo" -v shi="$shi" -v cm="$cm" -v clo="$clo" -v chi="$chi" \
  'BEGIN { printf "| wall time | %s (%s-%s) | %s (%s-%s) | %.3f |\n", sm, slo, shi, cm, clo, chi, sm / cm }'
