"""``python -m services.cli``: the `tokenrelay` command line."""

import sys

from services.cli.main import main

sys.exit(main())
