# Sourced by scripts/demo, scripts/test and scripts/bench-*: make .venv and the broker ready.
# Works on a fresh Debian / Ubuntu / Raspberry Pi OS machine. Idempotent and quick when done.

_as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@";
  else echo "edgeship: need root (or sudo) to run: $*" >&2; return 1; fi
}

_apt_updated=0
_apt_install() {
  if [ "$_apt_updated" = 0 ]; then _as_root apt-get update -qq; _apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive _as_root apt-get install -y -qq "$@" >/dev/null
}

edgeship_setup() {
  local extras="${EDGESHIP_EXTRAS:-onnxruntime,converter,fleet,dev}"
  local py="${PYTHON:-python3}"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "edgeship: Python >= 3.11 is required ($("$py" --version 2>&1))" >&2; return 1; }
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$py" -m venv .venv 2>/dev/null || { _apt_install python3-venv && rm -rf .venv && "$py" -m venv .venv; }
  fi
  local stamp=".venv/.edgeship-installed"
  local want
  want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing edgeship[$extras] into .venv (first run takes a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    # constraints.txt pins torch to the CPU build the numbers were measured with
    .venv/bin/python -m pip install -q -c constraints.txt $(_torch_index) -e ".[$extras]"
    echo "$want" > "$stamp"
  fi
  if [ -z "${EDGESHIP_MQTT_URL:-}" ] && ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    echo "==> installing mosquitto (apt-get)"
    _apt_install mosquitto
  fi
  # Debian's package may start a system broker on 1883; ours always use their own free ports.
  export PATH="$PWD/.venv/bin:$PATH:/usr/sbin"
}

# PyTorch's CPU-only wheel index when it answers within 5 s (PyPI's Linux torch pulls the
# CUDA libraries, ~3 GB); EDGESHIP_TORCH_INDEX="" turns it off.
_torch_index() {
  local url="${EDGESHIP_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
  [ -n "$url" ] || return 0
  if .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
      "$url/torch/" >/dev/null 2>&1; then echo "--extra-index-url $url"; fi
}

# System services the test suite runs for real (each test starts its own instance).
edgeship_test_deps() {
  local missing=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v mcopy >/dev/null || missing+=(mtools)
  command -v mkfs.vfat >/dev/null || [ -x /usr/sbin/mkfs.vfat ] || [ -x /sbin/mkfs.vfat ] || missing+=(dosfstools)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]} (apt-get) for the test suite"
    _apt_install "${missing[@]}"
  fi
  edgeship_aedes
}

# aedes 2 (MQTT 5) from npm, pinned by tests/support/aedes/package-lock.json, installed once
# into ~/.cache/edgeship (tests/brokers/ run a node of it; without Node.js they are skipped).
edgeship_aedes() {
  command -v node >/dev/null || { echo "edgeship: no Node.js: the aedes broker tests will be skipped" >&2; return 0; }
  .venv/bin/python -c 'from tests.support.brokers import ensure_aedes; print("==> aedes in", ensure_aedes())' \
    || echo "edgeship: aedes could not be installed (npm); its tests will be skipped" >&2
}

# Brokers other than Mosquitto, for the broker tests and scripts/cluster-check: Debian's
# ejabberd and redis-server, and aedes 2 from npm (pinned by tests/support/aedes/
# package-lock.json, installed once into ~/.cache/edgeship by tests/support/brokers.py).
edgeship_broker_deps() {
  local missing=()
  command -v ejabberdctl >/dev/null || [ -x /usr/sbin/ejabberdctl ] || missing+=(ejabberd)
  command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
  command -v node >/dev/null || missing+=(nodejs npm)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]} (apt-get) for the broker checks"
    # the packages would start system services; ours run on their own ports and dirs
    _apt_install "${missing[@]}"
  fi
  edgeship_aedes
}
