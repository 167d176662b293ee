"""``python -m aioshm``: list, show and remove named channels (see ``aioshm._cli``);
``python -m aioshm serve-nats`` runs a local NATS server (see ``aioshm.nats._serve``)."""

import sys

if sys.argv[1:2] == ["serve-nats"]:
    from .nats._serve import main as serve

    sys.exit(serve())

from ._cli import main

sys.exit(main())
