"""Run the command line as ``python -m bnsurgery`` (same as the ``bnsurgery`` script)."""

import sys

from bnsurgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
