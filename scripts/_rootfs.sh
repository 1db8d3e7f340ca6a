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
