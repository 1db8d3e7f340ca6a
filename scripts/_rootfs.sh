# Sourced by scripts/*-check: a Debian root file system built once with debootstrap (under
# qemu-user when it is another architecture), kept between runs, and commands run inside it.
#   rootfs_init NAME SUITE ARCH "pkg1,pkg2,..."   sets ROOTFS (EDGESHIP_<NAME>_ROOTFS wins)
#   rootfs_build                                   debootstrap once (EDGESHIP_CHECK_FRESH=1: again)
#   rootfs_mount                                   bind /proc and /dev (unmounted on exit)
#   in_rootfs CMD...                               run CMD in the root with a clean environment
#   retry_segv CMD...                              retry on qemu's SIGSEGV (exit 139), counted
# Needs root (debootstrap, chroot, mount). Slow the first time; never part of ./scripts/test.

ROOTFS_CACHE="${EDGESHIP_CHECK_CACHE:-/var/cache/edgeship-checks}"
MIRROR="${EDGESHIP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
t0=$(date +%s)
step() { echo "==> [$(( $(date +%s) - t0 ))s] $*"; }
qemu_segv=0
_rootfs_mounts=()

rootfs_init() {
  local var="EDGESHIP_${1^^}_ROOTFS"
  var="${var//-/_}"
  ROOTFS="${!var:-$ROOTFS_CACHE/$1/rootfs}"
  ROOTFS_SUITE="$2" ROOTFS_ARCH="$3" ROOTFS_PACKAGES="$4"
  [ "$(id -u)" = 0 ] || { echo "$(basename "$0"): needs root (debootstrap, chroot)" >&2; exit 2; }
  command -v debootstrap >/dev/null || { step "installing debootstrap (apt-get)"; _apt_install debootstrap; }
  local host qemu
  host="$(dpkg --print-architecture)"
  [ "$ROOTFS_ARCH" = "$host" ] && return 0
  case "$ROOTFS_ARCH" in arm64) qemu=aarch64 ;; armhf) qemu=arm ;; *) qemu="$ROOTFS_ARCH" ;; esac
  [ -e "/usr/bin/qemu-$qemu-static" ] || {
    step "installing qemu-user-static binfmt-support (apt-get)"
    _apt_install qemu-user-static binfmt-support; }
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e "/proc/sys/fs/binfmt_misc/qemu-$qemu" ] || update-binfmts --enable "qemu-$qemu"
  grep -q enabled "/proc/sys/fs/binfmt_misc/qemu-$qemu" || {
    echo "$(basename "$0"): the qemu-$qemu binfmt handler is not enabled" >&2; exit 1; }
}

rootfs_build() {
  if [ "${EDGESHIP_CHECK_FRESH:-0}" = 1 ]; then rm -rf "$ROOTFS"; fi
  local want="$ROOTFS_SUITE $ROOTFS_ARCH $ROOTFS_PACKAGES"
  if [ "$(cat "$ROOTFS/.edgeship-rootfs-ok" 2>/dev/null)" != "$want" ]; then
    step "debootstrap Debian $ROOTFS_SUITE $ROOTFS_ARCH into $ROOTFS (the slow part, once)"
    rm -rf "$ROOTFS"; mkdir -p "$ROOTFS"
    debootstrap --arch="$ROOTFS_ARCH" --variant=minbase --include="$ROOTFS_PACKAGES" \
      "$ROOTFS_SUITE" "$ROOTFS" "$MIRROR"
    echo "$want" > "$ROOTFS/.edgeship-rootfs-ok"
  fi
}

_rootfs_cleanup() {
  for ((i=${#_rootfs_mounts[@]}-1; i>=0; i--)); do umount -l "${_rootfs_mounts[$i]}" || true; done
}

# no /sys: onnxruntime's cpuinfo (aarch64 build) parses the host's x86 /sys/devices/system/cpu
# under qemu-user and dies with SIGSEGV on import; without /sys it falls back and works
rootfs_mount() {
  trap _rootfs_cleanup EXIT
  for d in proc dev; do
    mountpoint -q "$ROOTFS/$d" || { mount --bind "/$d" "$ROOTFS/$d"; _rootfs_mounts+=("$ROOTFS/$d"); }
  done
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  # A TLS-intercepting proxy (PIP_CERT / SSL_CERT_FILE on the host) needs its CA in the root too
  rootfs_env=()
  local host_ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
  if [ -n "$host_ca" ] && [ -f "$host_ca" ]; then
    mkdir -p "$ROOTFS/opt/check-ca"; cp "$host_ca" "$ROOTFS/opt/check-ca/ca.crt"
    rootfs_env=(PIP_CERT=/opt/check-ca/ca.crt SSL_CERT_FILE=/opt/check-ca/ca.crt)
  fi
  rootfs_env+=(PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-180}" PIP_DISABLE_PIP_VERSION_CHECK=1)
  CHECK=/opt/rootfs-check
  rm -rf "$ROOTFS$CHECK" "$ROOTFS/etc/edgeship" "$ROOTFS/var/lib/edgeship" \
    "$ROOTFS/etc/systemd/system/edgeship-agent.service"
  mkdir -p "$ROOTFS$CHECK"
}

in_rootfs() {
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    "${rootfs_env[@]}" "$@"
}

# qemu-user sometimes dies with SIGSEGV in multi-threaded programs (pip, onnxruntime's thread
# pool): retry a step up to 3 times on exit 139 and count it, so a flaky emulator is not
# mistaken for a broken agent (and a real crash still fails after 3 tries).
retry_segv() {
  local rc
  for attempt in 1 2 3; do
    rc=0; "$@" || rc=$?
    [ "$rc" = 139 ] || return "$rc"
    qemu_segv=$((qemu_segv + 1)); step "qemu SIGSEGV (attempt $attempt): $*"
  done
  return "$rc"
}

# the working tree as git sees it (tracked + untracked, not ignored), without .venv
rootfs_copy_tree() {
  rm -rf "$ROOTFS$1"; mkdir -p "$ROOTFS$1"
  git ls-files -co --exclude-standard -z | grep -zv '^\.venv' | tar --null -T - -cf - \
    | tar -xf - -C "$ROOTFS$1"
}

# in_rootfs with no network at all (a new, empty network namespace): an offline first boot
in_rootfs_offline() {
  unshare --net -- chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 "${rootfs_env[@]}" "$@"
}

# a fleet on the host (TUF repo, CA) and an enrollment bundle for DEVICE (extra args go to
# 'edgeship provision'), copied to $CHECK/bundle in the root
rootfs_enroll() {
  local device="$1" profile="$2"; shift 2
  local tmp; tmp="$(mktemp -d)"
  .venv/bin/edgeship keys init --keys "$tmp/keys" --repo "$tmp/repo" >/dev/null
  .venv/bin/edgeship broker ca-init --ca-dir "$tmp/ca" >/dev/null
  .venv/bin/edgeship provision "$device" --profile "$profile" \
    --broker mqtts://broker.invalid:8883 --ca-dir "$tmp/ca" --repo "$tmp/repo" \
    --out "$tmp/bundle" "$@"
  rm -rf "$ROOTFS$CHECK/bundle"; cp -r "$tmp/bundle" "$ROOTFS$CHECK/bundle"; rm -rf "$tmp"
}

# what install-agent must have made, with the key readable by the service user only
rootfs_check_install() {
  for f in /etc/edgeship/agent.toml /etc/edgeship/device.key /var/lib/edgeship/tuf/root.json \
           /etc/systemd/system/edgeship-agent.service \
           /etc/systemd/system/multi-user.target.wants/edgeship-agent.service; do
    [ -e "$ROOTFS$f" ] || [ -L "$ROOTFS$f" ] || { echo "install-agent did not create $f" >&2; return 1; }
  done
  in_rootfs id edgeship
  local mode; mode="$(in_rootfs stat -c %U:%a /etc/edgeship/device.key)"
  [ "$mode" = "edgeship:600" ] || { echo "device.key is $mode" >&2; return 1; }
}

# the agent's broker-free tests, from a copy without the sources next to them (so
# `import edgeship` is the installed one); extra args are pytest arguments
rootfs_tests() {
  rm -rf "$ROOTFS$CHECK/t"; mkdir -p "$ROOTFS$CHECK/t"
  cp -r tests "$ROOTFS$CHECK/t/"
  find "$ROOTFS$CHECK/t" -name __pycache__ -prune -exec rm -rf {} +
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    sh -c "cd $CHECK/t && /opt/edgeship/venv/bin/python -m pytest -q -p no:cacheprovider \
      -p tests.provisioning.rootfs_stage --timeout 900 $*"
}

# stage a model on the host for PROFILE (VARIANTS: converter variant ids), then one inference
# through the local API of an agent inside the root, with no broker
rootfs_infer() {
  local stage; stage="$(mktemp -d)"
  .venv/bin/python -m tests.provisioning.rootfs_stage stage "$stage" "$@"
  rm -rf "$ROOTFS$CHECK/state"
  cp -r "$stage/state" "$stage/agent.toml" "$stage/sample.json" "$ROOTFS$CHECK/"
  rm -rf "$stage"
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    sh -c "cd $CHECK/t && /opt/edgeship/venv/bin/python -m tests.provisioning.rootfs_stage infer $CHECK"
}
