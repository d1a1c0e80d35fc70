"""``python -m trainer.beam_score``: see :mod:`trainer.beam_score`."""

import sys

from trainer.beam_score import main

sys.exit(main())
