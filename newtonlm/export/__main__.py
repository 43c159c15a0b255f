"""``python -m newtonlm.export``: see :mod:`newtonlm.export.cli`."""

import sys

from .cli import main

sys.exit(main())
