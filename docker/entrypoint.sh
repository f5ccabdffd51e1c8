#!/bin/sh
# Put the Hugging Face cache and the runs on persistent storage (/data) when a Space
# has it mounted, else under the user's home; then run the given command.
set -e
if [ -d /data ] && [ -w /data ]; then
  state=/data
else
  state="${HOME:-/tmp}/tunelab-data"
fi
mkdir -p "$state/runs" "$state/huggingface"
export HF_HOME="${HF_HOME:-$state/huggingface}"
export TUNELAB_RUNS_DIR="${TUNELAB_RUNS_DIR:-$state/runs}"
# In a Space (SPACE_ID is set) several people share one app: isolate them.
if [ -n "$SPACE_ID" ]; then
  export TUNELAB_MULTI_USER="${TUNELAB_MULTI_USER:-1}"
fi
exec "$@"
