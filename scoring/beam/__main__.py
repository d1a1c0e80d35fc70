"""``python -m scoring.beam``: see :mod:`scoring.beam`."""

import sys

from scoring.beam import main

sys.exit(main())
