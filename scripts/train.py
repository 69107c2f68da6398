#!/usr/bin/env python3
"""Train a tfpar model from the shell; same as the ``tfpar-train`` command."""

from tfpar.run.cli import run_main

if __name__ == "__main__":
    run_main()
