#!/usr/bin/env bash
# Runs every cargo-fuzz target (or the ones named) for SECONDS each, one after another, from
# the checked-in seeds (fuzz/seeds/TARGET) plus tar seeds made here by GNU tar (plain, gzip,
# zstd, whiteouts, an opaque dir, hard links, a docker-save-like archive), into
# fuzz/corpus/TARGET (not committed). Prints one line per target: runs, seconds, crashes.
# A crash leaves its input in fuzz/artifacts/TARGET and makes the script exit 1.
#   bash scripts/fuzz.sh 600              # 10 minutes per target
#   bash scripts/fuzz.sh 60 apply reference
#   FUZZ_BUILD="--dev" bash scripts/fuzz.sh 10   # CI: a quicker build (fewer optimizations)
# Needs cargo-fuzz (`cargo install cargo-fuzz`); the stable toolchain builds the sanitizer
# instrumentation with RUSTC_BOOTSTRAP=1 (this machine has no nightly).
set -euo pipefail
secs=${1:-60}
shift || true
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here/fuzz"
command -v cargo-fuzz >/dev/null || { echo "scripts/fuzz.sh: needs cargo-fuzz: cargo install cargo-fuzz" >&2; exit 1; }
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^strata-fuzz$')
fi
export RUSTC_BOOTSTRAP=1

# Tar seeds, made fresh: the formats and markers the appliers and loaders must handle.
tars=$(mktemp -d)
trap 'rm -rf "$tars"' EXIT
t=$tars/t
mkdir -p "$t/etc/app" "$t/opq" "$t/dir"
echo hello > "$t/etc/app/conf"; ln "$t/etc/app/conf" "$t/etc/app/hard"; ln -s conf "$t/etc/app/soft"
: > "$t/etc/.wh.gone"; : > "$t/opq/.wh..wh..opq"; echo x > "$t/opq/kept"
mkdir -p "$tars/seeds"
tar -C "$t" -cf "$tars/seeds/plain.tar" .
tar -C "$t" -czf "$tars/seeds/gzip.tar" .
tar -C "$t" --zstd -cf "$tars/seeds/zstd.tar" . 2>/dev/null || true
tar -C "$t" --format=pax -cf "$tars/seeds/pax.tar" .
# A docker-save-like archive: a layer, a config, manifest.json.
a=$tars/archive; mkdir -p "$a"
tar -C "$t" -cf "$a/layer.tar" .
diff=$(sha256sum "$a/layer.tar" | cut -d' ' -f1)
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$diff" > "$a/config.json"
cfg=$(sha256sum "$a/config.json" | cut -d' ' -f1); mv "$a/config.json" "$a/$cfg.json"
printf '[{"Config":"%s.json","RepoTags":["localhost/fuzz:v1"],"Layers":["layer.tar"]}]' "$cfg" > "$a/manifest.json"
tar -C "$a" -cf "$tars/seeds/docker-save.tar" .

status=0
for target in "${targets[@]}"; do
  corpus=corpus/$target
  mkdir -p "$corpus" "artifacts/$target"
  [ -d "seeds/$target" ] && cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true
  case $target in
    apply|tar_reader|form_convert|load_archive) cp -n "$tars"/seeds/*.tar "$corpus"/ ;;
  esac
  log=$(mktemp)
  # shellcheck disable=SC2086
  if cargo fuzz run ${FUZZ_BUILD:-} "$target" "$corpus" -- -max_total_time="$secs" -rss_limit_mb=4096 \
      -artifact_prefix="artifacts/$target/" >"$log" 2>&1; then
    res=ok
  else
    res=CRASH
    status=1
  fi
  runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' | tail -1 || true)
  echo "$target: ${runs:-?} runs in ${secs}s: $res"
  if [ "$res" = CRASH ]; then tail -40 "$log"; fi
  rm -f "$log"
done
exit $status
