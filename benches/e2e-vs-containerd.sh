#!/usr/bin/env bash
# Strata against containerd on the same inputs, in one run, rounds interleaved:
#   unpack:  strata load -i IMAGE.tar            vs  ctr image import IMAGE.tar (overlayfs)
#   start:   strata run --rm IMAGE true           vs  ctr run --rm IMAGE ID true (runc)
#   commit:  strata commit of a container with 1,000 changed files
#                                                vs  ctr snapshots diff of an active snapshot
#            holding the same 1,000 changes (containerd's differ: the layer blob)
#   snapshot operations over gRPC (prepare, mounts, stat, commit, remove): strata snapshotter
#            serve vs containerd's overlayfs snapshotter served by its contrib/snapshotservice,
#            through one tonic client (the `snapshots` bench, run last)
# (Pull against skopeo+umoci and ctr: benches/pull-vs-peers.sh, which needs a registry.)
# Prints median (min-max) seconds and ratios strata/containerd. Run as root, after
#   cargo build --release -p strata-runtime
#   CONFORMANCE_BUILD=target/conformance bash ../shared/conformance/setup.sh   (the refserver)
# Usage: bash benches/e2e-vs-containerd.sh [N]   (default 3; the snapshot ops run 100*N rounds)
set -euo pipefail
N=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
strata="${STRATA_BIN:-$here/target/release/strata}"
[ -x "$strata" ] || { echo "build it first: cargo build --release -p strata-runtime" >&2; exit 1; }
for c in umoci containerd ctr runc busybox; do
  command -v "$c" >/dev/null || { echo "needs $c (scripts/test-all.sh installs it)" >&2; exit 1; }
done
refserver="${REFSERVER:-$here/target/conformance/bin/refserver}"
[ -x "$refserver" ] || {
  echo "needs containerd's snapshot service ($refserver): CONFORMANCE_BUILD=target/conformance bash ../shared/conformance/setup.sh" >&2
  exit 1
}
d=$(mktemp -d /var/tmp/e2ebench-XXXX)
cleanup() {
  [ -f "$d/ctrd.pid" ] && kill "$(cat "$d/ctrd.pid")" 2>/dev/null || true
  sleep 1
  umount -R "$d" 2>/dev/null || true
  rm -rf "$d"
}
trap cleanup EXIT

# The image: busybox and Python's standard library (~50 MB, 3,500 files), two layers.
L=$d/layout B=$d/bundle
umoci init --layout "$L" && umoci new --image "$L:latest"
umoci unpack --image "$L:latest" "$B" >/dev/null
mkdir -p "$B/rootfs/bin" "$B/rootfs/usr/lib"
cp "$(command -v busybox)" "$B/rootfs/bin/busybox"
for c in sh true mkdir; do ln -s busybox "$B/rootfs/bin/$c"; done
umoci repack --image "$L:latest" "$B" >/dev/null
rm -rf "$B"; umoci unpack --image "$L:latest" "$B" >/dev/null
cp -a /usr/lib/python3 "$B/rootfs/usr/lib/"
umoci repack --image "$L:latest" "$B" >/dev/null
umoci config --image "$L:latest" --config.cmd /bin/sh >/dev/null
tar -C "$L" -cf "$d/img.tar" .

. "$here/benches/containerd.sh"
start_containerd
ctr="ctr --address $d/ctrd.sock"

now() { date +%s%N; }
changes() { # dir: 1,000 new files in 10 dirs
  for i in $(seq 0 9); do mkdir -p "$1/work/d$i"; for j in $(seq 0 99); do echo "$i.$j" > "$1/work/d$i/f$j"; done; done
}
: >"$d/s-unpack"; : >"$d/c-unpack"; : >"$d/s-commit"; : >"$d/c-commit"; : >"$d/s-start"; : >"$d/c-start"
for round in $(seq "$N"); do
  # unpack, each into an empty store / namespace
  run_s_unpack() { rm -rf "$d/s$round"; sync; local t=$(now); "$strata" --root "$d/s$round" load -q -i "$d/img.tar"; echo $(( ($(now) - t) / 1000000 )) >>"$d/s-unpack"; }
  run_c_unpack() { sync; local t=$(now); $ctr -n "u$round" image import --base-name localhost/bench "$d/img.tar" >/dev/null; echo $(( ($(now) - t) / 1000000 )) >>"$d/c-unpack"; }
  if ((round % 2)); then run_s_unpack; run_c_unpack; else run_c_unpack; run_s_unpack; fi
  # container start and stop, 5 each per round
  run_s_start() { local t=$(now); "$strata" --root "$d/s$round" run --rm "localhost/img:latest" true >/dev/null; echo $(( ($(now) - t) / 1000000 )) >>"$d/s-start"; }
  run_c_start() { local t=$(now); $ctr -n "u$round" run --rm localhost/bench:latest "r$round-$1" true >/dev/null; echo $(( ($(now) - t) / 1000000 )) >>"$d/c-start"; }
  for k in 1 2 3 4 5; do
    if (((round + k) % 2)); then run_s_start; run_c_start "$k"; else run_c_start "$k"; run_s_start; fi
  done
  # commit of 1,000 changed files
  "$strata" --root "$d/s$round" run --name c "localhost/img:latest" true >/dev/null
  upper=$("$strata" --root "$d/s$round" inspect c | sed -n 's/.*"UpperDir": "\(.*\)",*$/\1/p')
  changes "$upper"
  # containerd: an active snapshot on the image's top layer, the same changes in its upper.
  top=$($ctr -n "u$round" snapshots --snapshotter overlayfs ls | awk 'NR>1 && $3=="Committed" {print $1}' | tail -1)
  $ctr -n "u$round" snapshots --snapshotter overlayfs prepare "work$round" "$top" >/dev/null
  cupper=$($ctr -n "u$round" snapshots --snapshotter overlayfs mounts /mnt "work$round" | grep -o 'upperdir=[^,]*' | cut -d= -f2)
  changes "$cupper"
  sync
  run_s_commit() { local t=$(now); "$strata" --root "$d/s$round" commit c "localhost/committed:$round" >/dev/null; echo $(( ($(now) - t) / 1000000 )) >>"$d/s-commit"; }
  run_c_commit() { local t=$(now); $ctr -n "u$round" snapshots --snapshotter overlayfs diff "work$round" >/dev/null; echo $(( ($(now) - t) / 1000000 )) >>"$d/c-commit"; }
  if ((round % 2)); then run_s_commit; run_c_commit; else run_c_commit; run_s_commit; fi
done
stats() { sort -n "$1" | awk '{a[NR]=$1} END {printf "%.3f %.3f %.3f", a[int((NR+1)/2)]/1000, a[1]/1000, a[NR]/1000}'; }
row() { # label strata-file ctr-file
  read -r sm slo shi <<<"$(stats "$2")"
  read -r cm clo chi <<<"$(stats "$3")"
  awk -v l="$1" -v sm="$sm" -v slo="$slo" -v shi="$shi" -v cm="$cm" -v clo="$clo" -v chi="$chi" \
    'BEGIN { printf "| %s | %s (%s-%s) | %s (%s-%s) | %.2f |\n", l, sm, slo, shi, cm, clo, chi, sm / cm }'
}
echo "Strata against containerd 1.6 (overlayfs snapshotter), $N interleaved rounds (s): median (min-max)"
echo "| | strata | containerd | ratio |"
echo "|---|---|---|---|"
row "unpack a 2-layer image (load vs ctr image import)" "$d/s-unpack" "$d/c-unpack"
row "container start+stop (run --rm IMAGE true)" "$d/s-start" "$d/c-start"
row "commit 1,000 changed files (strata commit vs ctr snapshots diff)" "$d/s-commit" "$d/c-commit"
echo
# Snapshot operations: the same client against both servers, interleaved op by op.
(cd "$here" && STRATA_BIN="$strata" REFSERVER="$refserver" STRATA_BENCH_ITERS=$((100 * N)) \
  STRATA_BENCH_DIR="$d" cargo bench --quiet -p strata-benches --bench snapshots 2>/dev/null)
