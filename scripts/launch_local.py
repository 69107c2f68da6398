#!/usr/bin/env python3
"""Run a command as a local multi-worker cluster; same as the ``tfpar-launch`` command."""

import sys

from tfpar.runtime.launcher import main

if __name__ == "__main__":
    sys.exit(main())
