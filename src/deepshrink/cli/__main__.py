"""``python -m deepshrink.cli``: the command line."""

import sys

from deepshrink.cli import main

sys.exit(main())
