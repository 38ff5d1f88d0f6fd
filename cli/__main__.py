"""`python -m cli ARGS`: the `graphir` command."""

import sys

from cli.main import main

sys.exit(main())
