"""``python -m xpcnn``: the ``xpcnn`` command, for an environment whose scripts folder is not on
the PATH."""

import sys

from .cli import main

if __name__ == "__main__":  # (not on a mere import: a documentation tool walking the package)
    sys.exit(main())
