#!/usr/bin/env python3
"""Worker VM entry: pull work items and run the task on each (see cflow/worker/entry.py)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cflow.worker import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(work_root=os.path.dirname(HERE)))
