#!/bin/bash
# Sample CFlow task: one work item = one CSV shard of the demo data set.
#
# CFlow runs this once per line of tasks.txt, with the line's fields as
# arguments (never through a shell): $1 is the shard's path under
# gs://$CFLOW_BUCKET/cflow/demo/. Whatever it writes to $CFLOW_OUTPUT_DIR is the
# item's output; CFlow uploads it and combines all items' files by name.
# Replace this with your own script; exit non-zero to report a failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec python3 "$here/train_predict.py" "$@"
