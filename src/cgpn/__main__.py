"""``python -m cgpn``: the same as the ``cgpn`` command."""

import sys

from cgpn.cli import main

sys.exit(main())
