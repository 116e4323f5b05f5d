#!/usr/bin/env python3
"""Worker VM shutdown hook: hand the in-flight work item back (see cflow/worker/entry.py)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cflow.worker import shutdown_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(shutdown_main(work_root=os.path.dirname(HERE)))
