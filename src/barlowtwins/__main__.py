"""``python -m barlowtwins`` runs the command line."""

import sys

from barlowtwins.cli import main

sys.exit(main())
