#!/usr/bin/env bash
# Submit a mona_ray run to a running Ray cluster through the Ray Jobs API.
#
#   RAY_ADDRESS=http://head:8265 MONA_OUTPUT_DIR=/shared/mona_ray/runs/openhermes \
#       launch/submit.sh model.path=/shared/models/Meta-Llama-3-8B sae.path=/shared/models/sae-llama-3-8b-32x
#
# Needs the `ray` CLI with the Jobs API client and a cluster whose nodes run ray[default]:
# `pip install -e ".[cluster]"` here and on every node (the Docker image has it).
#
# Everything after the script name is passed to `python -m mona_ray.run` as Hydra overrides.
# The job runs `python -m mona_ray.run +experiment=$MONA_EXPERIMENT <overrides>` on the head
# node with this repository uploaded as its working directory (files in .gitignore, e.g.
# outputs/, are not uploaded). Inputs, model, SAE and the output folder must be on storage
# that every node sees under the same path.
#
# Resume: submitting the same command again with the same output folder picks up where the
# last attempt stopped (finished embedding parts are kept, only missing ones are redone).
#
# Environment (all optional except the output folder):
#   RAY_ADDRESS          Ray dashboard / Jobs API address (default http://127.0.0.1:8265)
#   MONA_OUTPUT_DIR      absolute output folder on shared storage; required unless a
#                        run.output_dir=... override is given (a relative path would land in
#                        the job's temporary working directory and be lost)
#   MONA_EXPERIMENT      experiment config under mona_ray/conf/experiment (default
#                        openhermes_llama3); set it empty to run the base config (the demo)
#   MONA_STORE_DIR       shared embedding store (embed.store_dir): reuse embeddings across runs
#   MONA_ENTRYPOINT      Python module to run (default mona_ray.run)
#   MONA_PYTHON          Python on the cluster nodes (default python)
#   MONA_WORKING_DIR     directory uploaded as the job's working dir (default: this repository)
#   MONA_SUBMISSION_ID   Ray submission id (default: mona-ray-<experiment>-<UTC time>)
#   MONA_NO_WAIT=1       return at once instead of streaming logs until the job ends
#   MONA_DRY_RUN=1       print the command instead of running it
#
# Recent Ray (2.60 here) enables token authentication by default: export RAY_AUTH_MODE=token and
# make the cluster's token available (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
experiment="${MONA_EXPERIMENT-openhermes_llama3}"
entry="${MONA_ENTRYPOINT:-mona_ray.run}"
python="${MONA_PYTHON:-python}"
workdir="${MONA_WORKING_DIR:-$repo}"

die() { echo "submit.sh: $*" >&2; exit 2; }

overrides=()
have_output=0
for arg in "$@"; do
    case "$arg" in
        run.output_dir=*) have_output=1 ;;
    esac
    overrides+=("$arg")
done

if [[ -n "$experiment" ]]; then
    [[ -f "$repo/mona_ray/conf/experiment/$experiment.yaml" ]] \
        || die "MONA_EXPERIMENT=$experiment: no mona_ray/conf/experiment/$experiment.yaml"
    overrides=("+experiment=$experiment" "${overrides[@]}")
fi
if [[ -n "${MONA_OUTPUT_DIR:-}" ]]; then
    [[ "$MONA_OUTPUT_DIR" = /* ]] || die "MONA_OUTPUT_DIR=$MONA_OUTPUT_DIR must be an absolute path on shared storage"
    overrides+=("run.output_dir=$MONA_OUTPUT_DIR")
elif [[ $have_output -eq 0 ]]; then
    die "set MONA_OUTPUT_DIR=/shared/path (or pass run.output_dir=/shared/path): the output folder must be on storage every node sees, and the same folder on a re-run resumes the job"
fi
if [[ -n "${MONA_STORE_DIR:-}" ]]; then
    overrides+=("embed.store_dir=$MONA_STORE_DIR")
fi

submission_id="${MONA_SUBMISSION_ID:-mona-ray-${experiment:-demo}-$(date -u +%Y%m%dT%H%M%SZ)}"
# Ray's own default excludes (.git, .venv, venv, __pycache__) named here, and Ray's list emptied, so that
# Ray does not warn on every submission that it now leaves .git out
excludes='{"excludes": [".git", ".venv", "venv", "__pycache__", "outputs"]}'
export RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES="${RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES-}"
cmd=(ray job submit --address "$address" --submission-id "$submission_id"
     --working-dir "$workdir" --runtime-env-json "$excludes")
[[ "${MONA_NO_WAIT:-0}" = 1 ]] && cmd+=(--no-wait)
cmd+=(-- "$python" -m "$entry" "${overrides[@]}")

if [[ "${MONA_DRY_RUN:-0}" = 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
