"""`python -m ledgerflow` = the `ledgerflow` command."""

import sys

from ledgerflow.cli import main

sys.exit(main())
