"""``python -m barlowtwins`` runs the command line."""

import sys

from barlowtwins.app.cli import main

sys.exit(main())
