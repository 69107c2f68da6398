"""``python -m tfpar.launcher`` is ``tfpar-launch`` (the code is ``tfpar.runtime.launcher``)."""

import sys

from tfpar.runtime.launcher import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
