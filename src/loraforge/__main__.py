"""``python -m loraforge``: the command line (also what ``torchrun -m loraforge`` runs)."""

import sys

from loraforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
