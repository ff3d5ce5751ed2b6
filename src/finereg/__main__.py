"""``python -m finereg`` runs the ``finereg`` command (see :mod:`finereg.train.cli`)."""

import sys

from .train.cli import main

if __name__ == "__main__":
    sys.exit(main())
