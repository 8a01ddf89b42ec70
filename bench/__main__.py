"""``python -m bench``: see ``python -m bench --help`` and bench/README.md."""

import sys

from bench.main import main

sys.exit(main())
