#!/usr/bin/env bash
# Strata's FUSE union against fuse-overlayfs (Debian's 1.10, C) and kernel overlay, on the same
# lowers in the same run: each row is timed on a fresh mount (fresh upper, page cache dropped
# for the read rows), N rounds interleaved, median in ms. Prints a markdown table with the
# ratios strata/fuse-overlayfs and strata/kernel. Run as root, after
#   cargo build --release -p strata-runtime
# Usage: bash benches/fuse-vs-peers.sh [N]   (default 3)
set -euo pipefail
N=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
strata="${STRATA_BIN:-$here/target/release/strata}"
[ -x "$strata" ] || { echo "build it first: cargo build --release -p strata-runtime" >&2; exit 1; }
command -v fuse-overlayfs >/dev/null || { echo "needs fuse-overlayfs (apt-get install fuse-overlayfs)" >&2; exit 1; }
d=$(mktemp -d /var/tmp/fusebench-XXXX)
cleanup() { umount -l "$d"/m 2>/dev/null || true; rm -rf "$d"; }
trap cleanup EXIT

# The lowers: a 256 MiB file and a 10,000-file tree, on the same disk as the uppers.
mkdir -p "$d/lower/tree" "$d/m"
head -c $((256 << 20)) /dev/urandom > "$d/lower/big"
head -c $((64 << 20)) /dev/urandom > "$d/lower/mid"
for i in $(seq 1 100); do mkdir "$d/lower/tree/d$i"; for j in $(seq 1 100); do echo "$i.$j" > "$d/lower/tree/d$i/f$j"; done; done

mount_one() { # kind
  rm -rf "$d/u" "$d/w"; mkdir -p "$d/u" "$d/w"
  case $1 in
    strata) "$strata" mount --fuse --lower "$d/lower" --upper "$d/u" --work "$d/w" "$d/m" ;;
    fuse-overlayfs) fuse-overlayfs -o "lowerdir=$d/lower,upperdir=$d/u,workdir=$d/w" "$d/m" ;;
    kernel) mount -t overlay overlay -o "lowerdir=$d/lower,upperdir=$d/u,workdir=$d/w,index=off" "$d/m" ;;
  esac
}
now() { date +%s%N; }

declare -A T
rows=("seq read 256 MiB lower file" "stat 10k lower files" "readdir 100 dirs x 100 (merged)" \
      "copy-up 64 MiB (append 1 byte)" "create 10k files" "rm -rf 10k-file lower tree")
run_row() { # row kind -> ms
  local m=$d/m
  case $1 in
    0) sync; echo 3 > /proc/sys/vm/drop_caches; local t=$(now); cat "$m/big" > /dev/null ;;
    1) local t=$(now); find "$m/tree" -type f -exec stat -c %s {} + > /dev/null ;;
    2) local t=$(now); for i in $(seq 1 100); do ls -f "$m/tree/d$i" > /dev/null; done ;;
    3) sync; echo 3 > /proc/sys/vm/drop_caches; local t=$(now); echo x >> "$m/mid" ;;
    4) mkdir "$m/new"; local t=$(now); (cd "$m/new" && seq 1 10000 | xargs touch) ;;
    5) local t=$(now); rm -rf "$m/tree" ;;
  esac
  echo $(( ($(now) - t) / 1000000 ))
}
backends=(strata fuse-overlayfs kernel)
for round in $(seq 1 "$N"); do
  for r in "${!rows[@]}"; do
    # A different backend goes first each round: none always pays (or reaps) a cold cache.
    for i in 0 1 2; do
      k=${backends[$(( (i + round) % 3 ))]}
      mount_one $k
      T[$r,$k]+="$(run_row "$r" $k) "
      umount "$d/m"
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "FUSE union, $N interleaved rounds (order rotated), median ms (fresh mount per measurement; seq read and copy-up from a cold cache)"
echo "| row | strata FUSE | fuse-overlayfs 1.10 | kernel overlay | strata/fuse-overlayfs | strata/kernel |"
echo "|---|---|---|---|---|---|"
for r in "${!rows[@]}"; do
  s=$(echo "${T[$r,strata]}" | median); f=$(echo "${T[$r,fuse-overlayfs]}" | median); k=$(echo "${T[$r,kernel]}" | median)
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) b = 1; printf "%.2f", (a == 0 ? 1 : a) / b }'; }
  echo "| ${rows[$r]} | $s | $f | $k | $(ratio "$s" "$f") | $(ratio "$s" "$k") |"
done
