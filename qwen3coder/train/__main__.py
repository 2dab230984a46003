"""`python -m qwen3coder.train --profile gpu --out DIR` (the `qwen3coder train` subcommand, standalone)."""

import sys

from qwen3coder.train.cli import main

sys.exit(main())
