#!/usr/bin/env bash
# Submit a dist_ft training run to a running Ray cluster through its job API.
#
# Usage: launch/ray_submit.sh [--address URL] [--no-wait] CONFIG [a.b=c ...]
#
#   CONFIG     path relative to the repo root, e.g. configs/demo.yaml
#   a.b=c      config overrides, passed to `dist-ft train` after the ones set here
#   --address  Ray dashboard URL (default: $RAY_ADDRESS, else http://127.0.0.1:8265)
#   --no-wait  return once the job is submitted instead of streaming its logs
#
# The repo is uploaded as the job's working dir, so the uploaded dist_ft/ comes first on
# PYTHONPATH and local edits run without rebuilding anything. Its dependencies (torch,
# deepspeed, ray, ...) do not travel: the job runs in the python env already installed on the
# cluster nodes (the cluster/Dockerfile image, or `pip install -e .`), because shipping a
# 2 GB env per job would be slow and would drift from what the nodes run.
#
# Outputs: a relative run.output_dir (runs/demo by default) would land inside the job's
# uploaded copy of the repo, which Ray deletes with its session. For a cluster on this machine
# (an --address on 127.0.0.1, localhost or ::1, as `ray start --head` gives) it is made
# absolute under this repo, e.g. $REPO/runs/demo, and printed. For any other address pass an
# absolute run.output_dir=/path that the head node can write (a shared filesystem or volume).
# A remote cluster reached through a port-forward on 127.0.0.1 looks local: its head node then
# writes the printed path there, not here; pass run.output_dir yourself.
#
# Auth: Ray 2.60 turns token auth on for `ray start --head` whenever a token already exists
# (~/.ray/auth_token, e.g. left by an earlier dist-ft resources.ray_address=local run), but
# its job CLI sends the token only when RAY_AUTH_MODE=token. So, as `ray start` does, this
# script sets RAY_AUTH_MODE=token when RAY_AUTH_MODE is unset and a token is available
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
#
# Secrets: WANDB_API_KEY (and any other key) must be set on the cluster nodes themselves
# (image env, Kubernetes Secret, node profile). It is never put on a command line here,
# because the runtime env JSON is visible in `ps`, the dashboard and the job records.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

die() {
    echo "ray_submit.sh: $*" >&2
    exit 2
}

addr="${RAY_ADDRESS:-http://127.0.0.1:8265}"
wait_flag=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --address) (($# >= 2)) || die "--address needs a URL"; addr="$2"; shift 2 ;;
        --address=*) addr="${1#*=}"; shift ;;
        --no-wait) wait_flag=(--no-wait); shift ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
(($# >= 1)) || { usage >&2; exit 2; }
config="$1"
shift

# --working-dir . must be the repo root whatever directory this is called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -f "$config" ]] || die "config '$config' not found under $(pwd)"
command -v ray >/dev/null || die "the ray CLI is not on PATH (pip install 'ray[default]')"
command -v dist-ft >/dev/null || die "dist-ft is not on PATH (pip install -e . in $(pwd))"

# resources.ray_address=auto: the entrypoint runs on the head node, inside the cluster.
args=("$config" resources.mode=ray resources.ray_address=auto "$@")
# Resolving the config here also refuses a bad one (exit 2, the key named) before any upload.
resolved="$(dist-ft train "${args[@]}" --print-config)" || exit
# run.output_dir from the YAML that --print-config writes (PyYAML quotes odd strings with ').
out="$(awk -v q="'" '/^run:/ {r = 1; next} /^[^ ]/ {r = 0}
    r && sub(/^  output_dir: /, "") {gsub("^" q "|" q "$", ""); print}' <<<"$resolved")"
[[ -n "$out" ]] || die "could not read run.output_dir from the resolved config"
host="${addr#*://}"
host="${host%%/*}"
host="${host%:*}"
case "$host" in
    127.0.0.1 | localhost | "[::1]") local_out=1 ;;
    *) local_out=0 ;;
esac
if [[ "$out" != /* ]]; then
    case "$local_out" in
        1) out="$(pwd)/$out" ;;
        *) die "run.output_dir=$out is relative, so the job would write it inside its" \
            "temporary copy of the repo on the cluster; pass run.output_dir=/an/absolute/path" \
            "that the head node of $addr can write" ;;
    esac
    args+=("run.output_dir=$out")
fi
# A run.output_dir that holds another run is refused here, by the trainer's own check, rather
# than by the job after the upload. Only where the head node writes this machine's paths: a
# remote head's directory cannot be seen from here (its job refuses it as `dist-ft train` does).
if [[ "$local_out" == 1 ]]; then
    command -v python >/dev/null || die "no python on PATH (activate the env that has dist-ft)"
    python launch/slurm/preflight.py "${args[@]}" >/dev/null || exit
fi
echo "ray_submit.sh: run outputs go to $out on the node that runs the job" \
    "(the head node; this machine for a cluster started here)" >&2

if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] ||
    [[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
    export RAY_AUTH_MODE=token
    echo "ray_submit.sh: sending the Ray auth token (RAY_AUTH_MODE=token)" >&2
fi

# These values are spliced into JSON by hand, so accept only plain tokens.
safe() {
    [[ "$2" =~ ^[A-Za-z0-9._:-]+$ ]] || die "$1='$2' has characters this script will not quote"
    printf '%s' "$2"
}
env_vars="\"WANDB_MODE\": \"$(safe WANDB_MODE "${WANDB_MODE:-offline}")\""
if [[ -n "${DS_ACCELERATOR:-}" ]]; then
    env_vars+=", \"DS_ACCELERATOR\": \"$(safe DS_ACCELERATOR "$DS_ACCELERATOR")\""
fi
if [[ -n "${WANDB_API_KEY:-}" ]]; then
    echo "ray_submit.sh: note: WANDB_API_KEY is set here but is not forwarded;" \
        "set it on the cluster nodes." >&2
fi
# Ray refuses a working dir over 512 MiB (its gRPC message cap); .venv alone is about 2 GB.
excludes='[".venv", ".git", "runs", "wandb", "__pycache__"]'
runtime_env="{\"excludes\": $excludes, \"env_vars\": {$env_vars}}"

exec ray job submit --address "$addr" --working-dir . --runtime-env-json "$runtime_env" \
    ${wait_flag[@]+"${wait_flag[@]}"} -- dist-ft train "${args[@]}"
