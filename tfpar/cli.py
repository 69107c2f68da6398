"""``python -m tfpar.cli`` is ``tfpar-train`` (the code is ``tfpar.run.cli``)."""

from tfpar.run.cli import main, run_main

__all__ = ["main", "run_main"]

if __name__ == "__main__":
    run_main()
