#!/bin/bash
# EC2 user data: install instance-agent from its bundle in S3 and start its watcher; with a
# launching lifecycle hook, put the instance in service only if `instance-agent doctor
# --launch` passes (instance-agent launch-gate; its unit repeats it on later boots, for a
# warm pool). Runs once, as root, at first boot. Edit the settings, then paste this
# file as the launch template's user data. packaging/template.yaml carries the same script
# with its own settings (python3 packaging/sync_user_data.py keeps the two identical).
#
# The instance role needs what the agent uses (packaging/template.yaml, InstanceRole) plus
# s3:GetObject on the bundles under AGENT_BUNDLE_S3, and, with LAUNCH_HOOK,
# autoscaling:CompleteLifecycleAction on the group (and DescribeAutoScalingInstances). No NAT or
# pre-signed URL is needed: only the role and a route to S3 (a gateway endpoint is enough).
# A package index is needed only where the image lacks the interpreter: Amazon Linux 2023
# installs python3.12 from its own repositories (served from S3, so the gateway endpoint
# reaches them); Debian and Ubuntu need python3, python3-venv and python3-boto3 (or the AWS
# CLI), and reach their mirror only for those of them the image lacks.
# --- settings ------------------------------------------------------------------------------
# Where `python3 packaging/bundle.py` bundles were uploaded (ending in /); this script
# fetches instance-agent-py<python>-<arch>.tar.gz from there.
AGENT_BUNDLE_S3="s3://my-artifacts/instance-agent/0.1.0/"
# The group's launching lifecycle hook; empty when it has none.
LAUNCH_HOOK=""
# Flags for `instance-agent install-service` (they become /etc/instance-agent/agent.toml).
AGENT_FLAGS=(
  --bucket my-backups
  --topic-arn arn:aws:sns:us-east-1:123456789012:instance-agent
  --source /var/log
)
# --- end of settings -----------------------------------------------------------------------
set -euo pipefail
umask 022

PREFIX=/opt/instance-agent
IMDS=http://169.254.169.254
LAUNCH_DONE=0

retry() {
  # Every network step: package mirrors, S3 and Auto Scaling fail transiently at first
  # boot. Exponential backoff with jitter, about 2 minutes in all.
  local attempt
  for attempt in 1 2 3 4 5 6; do
    if "$@"; then
      return 0
    fi
    echo "attempt $attempt of 6 failed: $1" >&2
    sleep $(((1 << attempt) + RANDOM % 3))
  done
  return 1
}

imds_get() {
  # IMDSv2 only: a session token first, then the read.
  local token
  token="$(curl -sSf -X PUT "$IMDS/latest/api/token" \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')" || return 1
  curl -sSf -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/$1"
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
        return 1
      fi
      # The system python3 is 3.9 for the life of AL2023: too old for current boto3. Its
      # repositories are served from S3, so this works through a gateway endpoint.
      retry dnf install -y python3.12 python3.12-pip
      PYTHON=/usr/bin/python3.12
      ;;
    ubuntu | debian)
      # Ubuntu 22.04 has 3.10, 24.04 3.12, Debian 12 3.11. The bundle needs python3 with
      # venv, and fetching it needs the AWS CLI or python3-boto3. Only what the image lacks
      # is installed: an image that holds them needs no package index; one that lacks them
      # needs a route to its package mirror, and fails here, clearly, without one.
      local missing=() pkg
      for pkg in python3 python3-venv python3-boto3; do
        if [[ $pkg == python3-boto3 ]] && command -v aws > /dev/null 2>&1; then
          continue
        fi
        dpkg-query -W -f='${Status}' "$pkg" 2> /dev/null | grep -q ' installed$' || missing+=("$pkg")
      done
      if ((${#missing[@]})); then
        echo "installing ${missing[*]} from the package mirror (not in this image)"
        export DEBIAN_FRONTEND=noninteractive
        # `apt-get update` exits 0 even when no mirror answers: the install is the test.
        if ! retry apt-get -o DPkg::Lock::Timeout=300 update -q ||
          ! retry apt-get -o DPkg::Lock::Timeout=300 install -y -q "${missing[@]}"; then
          echo "cannot install ${missing[*]}: this image lacks them and no package mirror" \
            "answers; bake them into the image, or give the instance a route to its mirror" >&2
          return 1
        fi
      fi
      PYTHON=/usr/bin/python3
      ;;
    *)
      echo "unsupported distribution: ${id:-unknown}" >&2
      return 1
      ;;
  esac
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "$PYTHON is older than 3.10" >&2
    return 1
  }
}

fetch_bundle() {
  # $1: s3:// URL, $2: local file. With the instance role: the AWS CLI where it is
  # installed (Amazon Linux 2023), else the distribution's boto3.
  if command -v aws > /dev/null 2>&1; then
    aws s3 cp --only-show-errors "$1" "$2"
  else
    python3 - "$1" "$2" << 'PY'
import os
import sys

import boto3

url, dest = sys.argv[1], sys.argv[2]
bucket, _, key = url[len("s3://"):].partition("/")
# boto3 reads AWS_ENDPOINT_URL(_S3) itself only from 1.28 on; Debian 12 has 1.26
# (https://docs.aws.amazon.com/sdkref/latest/guide/feature-ss-endpoints.html).
endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
boto3.client("s3", endpoint_url=endpoint).download_file(bucket, key, dest)
PY
  fi
}

install_bundle() {
  # $1: the bundle file. Offline: every wheel is in it.
  local dir
  dir="$(mktemp -d)"
  tar -xzf "$1" -C "$dir"
  if [[ ! -x "$PREFIX/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$PREFIX"
  fi
  "$PREFIX/bin/python" -m pip install --quiet --no-index --find-links "$dir/wheels" instance-agent
  rm -rf "$dir"
}

complete_launch() {
  # $1: CONTINUE or ABANDON. With the agent's boto3 if it got installed, else the AWS CLI.
  [[ -n "$LAUNCH_HOOK" ]] || return 0
  if [[ -x "$PREFIX/bin/python" ]] && "$PREFIX/bin/python" - "$LAUNCH_HOOK" "$1" << 'PY'; then
import sys

import boto3

from instance_agent.imds import IMDS

hook, result = sys.argv[1], sys.argv[2]
imds = IMDS()
instance_id, region = imds.instance_id(), imds.region()
client = boto3.client("autoscaling", region_name=region)
found = client.describe_auto_scaling_instances(InstanceIds=[instance_id])["AutoScalingInstances"]
client.complete_lifecycle_action(
    AutoScalingGroupName=found[0]["AutoScalingGroupName"], LifecycleHookName=hook,
    InstanceId=instance_id, LifecycleActionResult=result)
PY
    return 0
  fi
  command -v aws > /dev/null 2>&1 || return 1
  local instance_id region group
  instance_id="$(imds_get instance-id)" && region="$(imds_get placement/region)" || return 1
  group="$(aws autoscaling describe-auto-scaling-instances --region "$region" \
    --instance-ids "$instance_id" --query 'AutoScalingInstances[0].AutoScalingGroupName' \
    --output text)" || return 1
  aws autoscaling complete-lifecycle-action --region "$region" --auto-scaling-group-name "$group" \
    --lifecycle-hook-name "$LAUNCH_HOOK" --instance-id "$instance_id" \
    --lifecycle-action-result "$1"
}

launch_gate() {
  # In service only if a backup would work here: `instance-agent launch-gate` runs
  # doctor --launch, then completes CONTINUE, else ABANDON (Auto Scaling replaces it).
  # It answers a live launching action once; instance-agent-launch.service runs it again on
  # every later boot, as user data runs on the first boot only and a warm pool's instance
  # waits in Pending:Wait again when it leaves the pool.
  [[ -n "$LAUNCH_HOOK" ]] || return 0
  LAUNCH_DONE=1
  retry "$PREFIX/bin/instance-agent" launch-gate --hook "$LAUNCH_HOOK"
}

on_exit() {
  # Any failure before the gate: give the launch back at once rather than at the hook's
  # timeout (its DefaultResult is ABANDON as well).
  if [[ "$LAUNCH_DONE" == 0 && -n "$LAUNCH_HOOK" ]]; then
    echo "install failed: launching lifecycle action ABANDON" >&2
    retry complete_launch ABANDON || true
  fi
}

main() {
  exec > >(tee -a /var/log/instance-agent-install.log) 2>&1
  echo "instance-agent install: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  trap on_exit EXIT
  install_python
  local version arch bundle
  version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  arch="$(uname -m)"
  AWS_DEFAULT_REGION="$(retry imds_get placement/region)"
  export AWS_DEFAULT_REGION
  bundle="$(mktemp -d)/instance-agent-py$version-$arch.tar.gz"
  retry fetch_bundle "${AGENT_BUNDLE_S3}instance-agent-py$version-$arch.tar.gz" "$bundle"
  install_bundle "$bundle"
  rm -rf "$(dirname "$bundle")"
  # Writes the unit and agent.toml, then daemon-reload and enable --now.
  "$PREFIX/bin/instance-agent" install-service "${AGENT_FLAGS[@]}"
  echo "instance-agent installed: $("$PREFIX/bin/instance-agent" --version)"
  launch_gate
}

# Sourced with INSTANCE_AGENT_USER_DATA_LIB=1 (the tests), it only defines the functions.
if [[ "${INSTANCE_AGENT_USER_DATA_LIB:-}" != 1 ]]; then
  main
fi
