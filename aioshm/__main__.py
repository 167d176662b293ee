"""``python -m aioshm``: list, show and remove named channels (see ``aioshm._cli``)."""

import sys

from ._cli import main

sys.exit(main())
