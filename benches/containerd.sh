# Sourced by the bench scripts: a private containerd (own root, state and socket under $d,
# never the system one), its pid in $d/ctrd.pid.
start_containerd() {
  rm -rf "$d/ctrd"
  cat > "$d/config.toml" <<TOML
version = 2
root = "$d/ctrd/root"
state = "$d/ctrd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/ctrd.sock"
[ttrpc]
  address = "$d/ctrd.sock.ttrpc"
TOML
  containerd --config "$d/config.toml" >"$d/ctrd.log" 2>&1 &
  echo $! >"$d/ctrd.pid"
  for _ in $(seq 100); do [ -S "$d/ctrd.sock" ] && break; sleep 0.1; done
}
