"""`python -m pop3d`: the same as the `pop3d` command."""

import sys

from pop3d.cli import main

sys.exit(main())
