"""``python -m node`` is the ``lamina`` command."""

from node.cli import main

main()
