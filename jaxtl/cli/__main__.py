"""``python -m jaxtl.cli``: the ``jaxtl`` command."""

from jaxtl.cli import run

run()
