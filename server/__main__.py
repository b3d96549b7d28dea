"""``python -m server ...`` is the ``deltaserve`` command (``python -m server serve`` runs the server)."""
import sys

from .cli import main

sys.exit(main())
