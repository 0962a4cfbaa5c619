#!/usr/bin/env bash
# Build (once) the Debian root that the system test boots, cached by its package list.
# Prints the root's directory on stdout. Needs root, debootstrap and Debian's mirror.
set -euo pipefail

# What an EC2 Debian 12 image holds that the test relies on: systemd as PID 1, cloud-init,
# python3 with venv (the user data's interpreter), python3-boto3 and curl (the user data
# fetches the bundle with them), zstd (the agent's journal export), iproute2.
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,python3-boto3,zstd,iproute2,cloud-init,curl,ca-certificates,procps
# debootstrap does not resolve virtual packages: python3-cryptography (cloud-init needs it)
# wants python3-cffi-backend-api-*, which python3-cffi-backend provides.
PACKAGES+=,python3-cffi-backend
SUITE=bookworm

mirror() {
  # The mirror apt already uses on this machine (deb822 or one-line sources).
  local uri
  uri=$(grep -hoE '^URIs: *http[^ ]*debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | sed 's/^URIs: *//')
  [[ -n $uri ]] || uri=$(grep -hoE '^deb +http[^ ]*debian/?( |$)' /etc/apt/sources.list 2>/dev/null | head -n1 | awk '{print $2}')
  echo "${uri:-http://deb.debian.org/debian}"
}

key=$(printf '%s %s root-v1\n' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/instance-agent-system/$key"
if [[ -e $cache/.complete ]]; then
  echo "$cache"
  exit 0
fi
rm -rf "$cache"
mkdir -p "$cache"
echo "system: building the Debian root in $cache (once, about 1-2 min)" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$cache/root" "$(mirror)" > "$cache/debootstrap.log" 2>&1 || {
  tail -n 20 "$cache/debootstrap.log" >&2
  echo "system: error: debootstrap failed (log: $cache/debootstrap.log)" >&2
  exit 1
}
# cloud-init's locale module needs the locales package; the test does not need a locale.
mkdir -p "$cache/root/etc/cloud/cloud.cfg.d"
cat > "$cache/root/etc/cloud/cloud.cfg.d/99-system-test.cfg" << 'CFG'
# The system test's instance: EC2's metadata service only (served by the test's stand-in).
datasource_list: [ Ec2, None ]
datasource:
  Ec2:
    strict_id: false
    metadata_urls: [ "http://169.254.169.254" ]
    max_wait: 30
    timeout: 5
locale: false
CFG
# The network inside the container is set up by the test (a veth it configures).
rm -f "$cache/root/etc/machine-id"
: > "$cache/root/etc/machine-id"
apt-get -o RootDir="$cache/root" clean 2> /dev/null || rm -rf "$cache/root/var/cache/apt/archives/"*.deb
touch "$cache/.complete"
echo "$cache"
