#!/usr/bin/env python3
"""Controller entry: run every work item of const.py on a fleet of VMs (see cflow/run.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cflow.run import main

if __name__ == "__main__":
    sys.exit(main())
