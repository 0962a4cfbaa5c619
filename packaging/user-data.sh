#!/bin/bash
# EC2 user data: install instance-agent into a venv under /opt/instance-agent and start its
# systemd service. Edit the settings below, then paste this file as the instance's (or the
# launch template's) user data. It runs once, as root, at first boot.
#
# The instance role needs what the agent uses (s3:PutObject and multipart calls on the
# bucket, sns:Publish, autoscaling:Describe*/RecordLifecycleActionHeartbeat/
# CompleteLifecycleAction), plus s3:GetObject on AGENT_WHEEL when it is an s3:// path.

# --- settings ------------------------------------------------------------------------------
# The wheel to install: an https:// URL or an s3://bucket/key path.
AGENT_WHEEL="s3://my-artifacts/instance-agent/instance_agent-0.1.0-py3-none-any.whl"
# Flags for `instance-agent install-service` (they become /etc/instance-agent/agent.toml).
AGENT_FLAGS=(
  --bucket my-backups
  --topic-arn arn:aws:sns:us-east-1:123456789012:instance-agent
  --source /var/log
)
# ------------------------------------------------------------------------------------------

set -euo pipefail
umask 022

PREFIX=/opt/instance-agent
LOG=/var/log/instance-agent-install.log
exec > >(tee -a "$LOG") 2>&1
echo "instance-agent install: $(date -u +%Y-%m-%dT%H:%M:%SZ)"

retry() {
  # Package mirrors and S3 can fail transiently at first boot.
  local attempt
  for attempt in 1 2 3 4 5; do
    if "$@"; then
      return 0
    fi
    echo "attempt $attempt of 5 failed: $*" >&2
    sleep $((attempt * 5))
  done
  return 1
}

install_python() {
  # Sets PYTHON to an interpreter new enough for current boto3 (>= 3.10) with venv.
  local id="" version_id=""
  # shellcheck disable=SC1091  # /etc/os-release exists on every supported system
  . /etc/os-release
  id="${ID:-}"
  version_id="${VERSION_ID:-}"
  case "$id" in
    amzn)
      if [[ "$version_id" != 2023* ]]; then
        echo "unsupported Amazon Linux $version_id: use Amazon Linux 2023" >&2
        exit 1
      fi
      # The system python3 is 3.9 for the life of AL2023: too old for current boto3.
      retry dnf install -y python3.12 python3.12-pip
      PYTHON=/usr/bin/python3.12
      ;;
    ubuntu | debian)
      # Ubuntu 22.04 has 3.10 and 24.04 has 3.12; only the venv module is missing.
      export DEBIAN_FRONTEND=noninteractive
      # cloud-init may still hold the dpkg lock at first boot: wait for it.
      retry apt-get -o DPkg::Lock::Timeout=300 update -q
      retry apt-get -o DPkg::Lock::Timeout=300 install -y -q python3 python3-venv
      PYTHON=/usr/bin/python3
      ;;
    *)
      echo "unsupported distribution: ${id:-unknown}" >&2
      exit 1
      ;;
  esac
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "$PYTHON is older than 3.10" >&2
    exit 1
  }
}

fetch_wheel() {
  # Prints the local path of the wheel named by AGENT_WHEEL.
  local dest
  dest="$(mktemp -d)/$(basename "$AGENT_WHEEL")"
  case "$AGENT_WHEEL" in
    s3://*)
      # boto3 (in the venv already) uses the instance role; no AWS CLI needed.
      retry "$PREFIX/bin/python" - "$AGENT_WHEEL" "$dest" <<'PY'
import sys
import boto3

url, dest = sys.argv[1], sys.argv[2]
bucket, _, key = url[len("s3://"):].partition("/")
boto3.client("s3").download_file(bucket, key, dest)
PY
      ;;
    https://*)
      retry "$PREFIX/bin/python" - "$AGENT_WHEEL" "$dest" <<'PY'
import sys
import urllib.request

urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
PY
      ;;
    *)
      echo "AGENT_WHEEL must be an https:// URL or an s3:// path" >&2
      exit 1
      ;;
  esac
  echo "$dest"
}

install_python
if [[ ! -x "$PREFIX/bin/python" ]]; then
  "$PYTHON" -m venv "$PREFIX"
fi
retry "$PREFIX/bin/python" -m pip install --quiet --upgrade pip
retry "$PREFIX/bin/python" -m pip install --quiet boto3
WHEEL="$(fetch_wheel)"
retry "$PREFIX/bin/python" -m pip install --quiet "$WHEEL"
rm -rf "$(dirname "$WHEEL")"

# Writes the unit and agent.toml, then daemon-reload and enable --now.
"$PREFIX/bin/instance-agent" install-service "${AGENT_FLAGS[@]}"
echo "instance-agent installed: $("$PREFIX/bin/instance-agent" --version)"
