"""`python -m multitoken` (what `torchrun -m multitoken train ...` runs)."""

import sys

from multitoken.cli import main

sys.exit(main())
