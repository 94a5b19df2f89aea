"""`python -m pypooler` is the `pypooler` command."""

import sys

from pypooler.cli import main

sys.exit(main())
