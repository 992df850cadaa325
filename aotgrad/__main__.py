"""``python -m aotgrad ...``: the same as the ``aotgrad`` console script."""

import sys

from .cli import main

sys.exit(main())
