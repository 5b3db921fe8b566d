"""``python -m jaxtl.cli``: the ``jaxtl`` command."""

import sys

from jaxtl.cli import main

sys.exit(main())
