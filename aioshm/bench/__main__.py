"""``python -m aioshm.bench``: see :mod:`aioshm.bench.cli`."""

import sys

from .cli import main

sys.exit(main())
