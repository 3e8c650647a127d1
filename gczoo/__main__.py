"""``python -m gczoo``: the ``gczoo`` command line (:mod:`gczoo.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
