#!/usr/bin/env bash
# The system test: boots a Debian 12 root under a real systemd (systemd-nspawn), lets
# cloud-init run the template's user data from an IMDS stand-in, and drives a launch, a
# scale-in, a stop during a backup and a reboot against local stand-ins of AWS. See
# docs/system-test.md, "Tested on a real systemd". Not part of the pytest run.
#
#     sudo bash tests/system/run.sh        # from the checkout; makes .venv if missing
#
# Exits 0 with "system: skipped: <reason>" where it cannot run (not root, not Linux, no
# systemd-nspawn or debootstrap and no apt to install them, no network namespaces). Network: two namespaces of its own joined by a veth
# ("aws" holds the stand-ins and 169.254.169.254; "instance" is the container's) and their
# loopback: no stand-in, and no metadata address, is reached from the host's own namespace.
set -euo pipefail
cd "$(dirname "$0")/../.."
skip() {
  echo "system: skipped: $*"
  exit 0
}
[[ $(id -u) == 0 ]] || skip "needs root (debootstrap, network namespaces, systemd-nspawn)"
[[ $(uname -s) == Linux ]] || skip "needs Linux"
SECONDS=0
if [[ ! -x .venv/bin/python ]]; then
  # A fresh clone: the venv of the README's test command (the stand-ins and the bundle
  # builder come from the `test` extra).
  echo "system: creating .venv (pip install -e '.[test]')" >&2
  if ! { python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' > .venv/install.log 2>&1; }; then
    tail -n 5 .venv/install.log >&2 || true
    skip "could not create .venv with python3 -m venv and pip (.venv/install.log)"
  fi
fi
need=()
command -v debootstrap > /dev/null || need+=(debootstrap)
command -v systemd-nspawn > /dev/null || need+=(systemd-container)
if ((${#need[@]})); then
  command -v apt-get > /dev/null || skip "no ${need[*]} and no apt-get to install them"
  echo "system: installing ${need[*]} with apt" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" > /dev/null ||
    skip "apt-get install ${need[*]} failed"
fi
command -v ip > /dev/null || skip "no ip (iproute2)"
ip netns list > /dev/null 2>&1 || skip "ip netns does not work here"

cache=$(bash tests/system/root.sh)
echo "system: root ready in ${SECONDS} s ($cache)" >&2

id=$$
aws_ns="ia-sys-aws-$id"
inst_ns="ia-sys-inst-$id"
work=$(mktemp -d /tmp/ia-system.XXXXXX)
# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
  local rc=$?
  # The driver stops the container and its servers; this is the net for a driver killed.
  if [[ -n ${driver_pid:-} ]] && kill -0 "$driver_pid" 2> /dev/null; then
    kill "$driver_pid" 2> /dev/null || true
    wait "$driver_pid" 2> /dev/null || true
  fi
  for pidfile in "$work"/*.pid; do
    [[ -e $pidfile ]] || continue
    kill "$(cat "$pidfile")" 2> /dev/null || true
  done
  for merged in "$work"/merged*; do
    umount "$merged" 2> /dev/null || umount -l "$merged" 2> /dev/null || true
  done
  ip netns del "$inst_ns" 2> /dev/null || true
  ip netns del "$aws_ns" 2> /dev/null || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The instance's disk: the cached root, read-only, under an overlay of this run's own. A
# reboot boots the same merged tree again, so what the first boot wrote is still there.
mkdir -p "$work/upper" "$work/ovl" "$work/merged"
mount -t overlay overlay -o "lowerdir=$cache/root,upperdir=$work/upper,workdir=$work/ovl" "$work/merged"

# The agent's bundle for the root's Python, as a release would build it (here, in the host's
# namespace: pip reaches this machine's package index; the namespaces reach nothing).
python=$(basename "$(readlink -f "$cache/root/usr/bin/python3")")
SECONDS_BUNDLE=$SECONDS
.venv/bin/python packaging/bundle.py --python-version "${python#python}" --out "$work/dist" > "$work/bundle.out" 2> "$work/bundle.err" || {
  tail -n 20 "$work/bundle.err" >&2
  echo "system: FAILED: bundle: packaging/bundle.py failed" >&2
  exit 1
}
echo "system: bundle for ${python} built in $((SECONDS - SECONDS_BUNDLE)) s" >&2

# "aws": the stand-ins at 10.213.0.1 and the metadata service at 169.254.169.254.
# "instance": the container, 10.213.0.2, with a route to both.
ip netns add "$aws_ns"
ip netns add "$inst_ns"
ip -n "$aws_ns" link set lo up
ip -n "$inst_ns" link set lo up
ip -n "$aws_ns" link add veth-aws type veth peer name eth0 netns "$inst_ns"
ip -n "$aws_ns" addr add 10.213.0.1/24 dev veth-aws
ip -n "$aws_ns" addr add 169.254.169.254/32 dev veth-aws
# An address the instance reaches but the unit's ip_allow does not name (the firewall check).
ip -n "$aws_ns" addr add 10.214.0.1/32 dev veth-aws
ip -n "$aws_ns" link set veth-aws up
ip -n "$inst_ns" addr add 10.213.0.2/24 dev eth0
ip -n "$inst_ns" link set eth0 up
ip -n "$inst_ns" route add 169.254.169.254/32 dev eth0 src 10.213.0.2
ip -n "$inst_ns" route add 10.214.0.1/32 dev eth0 src 10.213.0.2

# nsenter --net, not `ip netns exec`: that one mounts a sysfs of its own, without the
# cgroup hierarchy that systemd-nspawn needs.
nsenter --net="/run/netns/$aws_ns" .venv/bin/python tests/system/driver.py \
  --root "$work/merged" --lower "$cache/root" --work "$work" --bundle "$(cat "$work/bundle.out")" --netns "/run/netns/$inst_ns" &
driver_pid=$!
set +e
wait "$driver_pid"
rc=$?
set -e
driver_pid=
echo "system: $([[ $rc == 0 ]] && echo passed || echo FAILED) in ${SECONDS} s" >&2
exit "$rc"
