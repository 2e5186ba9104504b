#!/usr/bin/env bash
# Installs everything the test suite needs (Debian packages when root, Python
# packages in .venv) and runs lint, types, import contracts and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(curl dnsutils dnsmasq squid rsyslog rsyslog-gnutls rsyslog-relp nftables iptables iproute2 conntrack wrk kubernetes-client chromium)
# A package whose program is already installed from elsewhere is not installed again (kubectl
# from another package would conflict with Debian's).
declare -A PROGRAM_OF=([kubernetes-client]=kubectl)
missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  program="${PROGRAM_OF[$p]:-}"
  if [ -n "$program" ] && command -v "$program" >/dev/null; then
    continue
  fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "not root or no apt-get: tests that need ${missing[*]} will be skipped" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

export PATH="$PWD/.venv/bin:$PATH"
ruff format --check .
ruff check .
mypy
lint-imports
pytest "$@"
