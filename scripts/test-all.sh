#!/usr/bin/env bash
# Every check and test of Strata, on a fresh Debian bookworm machine, as root.
# Installs what it needs (Debian packages) first; a missing prerequisite fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test-all.sh: run as root (the tests mount overlays, chown, mknod; apt-get installs tools)" >&2
  exit 1
fi

# Real tools the tests run: umoci and skopeo (image interop), GNU tar (sparse archives, bench
# reference), attr (getfattr), kmod (overlay module), containerd + runc (the proxy-plugin
# end-to-end test), busybox-static (the test image's userland), fuse3 (fusermount3 for
# rootless FUSE mounts), fuse-overlayfs (the FUSE peer; the snapshotter's FUSE-mode tests use it
# as a mount helper), python3 (a second process holding POSIX locks in the FUSE tests), strace
# (counts a FUSE server's syncs), docker-registry (distribution 2.8: the registry pull/push run against), apache2-utils
# (htpasswd for its basic auth), curl (puts an image index by hand), openssl (signs the test
# token server's JWTs), libacl1-dev (to build pjdfstest, the POSIX suite), acl (setfacl and
# getfacl: ACLs through the FUSE union). The conformance suite's own setup installs Go and
# containerd's sources.
packages=(umoci skopeo tar attr kmod containerd runc busybox-static fuse3 fuse-overlayfs python3 strace
  docker-registry apache2-utils curl openssl libacl1-dev acl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
grep -qw overlay /proc/filesystems || modprobe overlay || {
  echo "scripts/test-all.sh: kernel overlayfs is not available" >&2
  exit 1
}

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "== pjdfstest 0.2.2 (the POSIX suite the FUSE tests run) and its second test user"
command -v pjdfstest >/dev/null || cargo install --quiet pjdfstest --version 0.2.2
id tests >/dev/null 2>&1 || useradd -M -U tests
echo "== fuzz: every target built and run for 10 s (bash scripts/fuzz.sh 600 for the long run)"
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz
FUZZ_BUILD="--dev" bash scripts/fuzz.sh 10
echo "== strata demo"
cargo build --release --quiet -p strata-runtime
./target/release/strata demo
echo "== cargo test"
cargo test --workspace --no-fail-fast

echo "== containerd's snapshotter conformance suite against strata snapshotter serve"
shared="$(cd .. && pwd)/shared"
if [ ! -x "$shared/conformance/run.sh" ]; then
  echo "scripts/test-all.sh: $shared/conformance is missing (CI puts ../shared beside the clone)" >&2
  exit 1
fi
export CONFORMANCE_BUILD="$PWD/target/conformance"
bash "$shared/conformance/setup.sh"
(umask 022 && CONFORMANCE_STRICT_SHUTDOWN=1 bash "$shared/conformance/run.sh" proxy \
  --server "$PWD/target/release/strata snapshotter serve --root {root} --address {socket}")
echo "== the same suite against strata snapshotter serve --mode fuse (Strata's FUSE unions)"
(umask 022 && CONFORMANCE_STRICT_SHUTDOWN=1 bash "$shared/conformance/run.sh" proxy \
  --server "$PWD/target/release/strata snapshotter serve --mode fuse --root {root} --address {socket}")
