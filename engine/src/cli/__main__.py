"""``python -m edmrt.cli ...``: the same as the ``edmrt`` command."""
import sys

from . import main

sys.exit(main())
