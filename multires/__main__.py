"""`python -m multires` runs the command line (torchrun launches `multires train --devices N` so)."""

import sys

from multires.cli import main

sys.exit(main())
