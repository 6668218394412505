"""``python -m bench.compare``: what ``bench/run`` executes."""

import sys

from .cli import main

sys.exit(main())
