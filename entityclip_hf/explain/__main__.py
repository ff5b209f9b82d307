"""``python -m entityclip_hf.explain``."""

import sys

from .cli import main

sys.exit(main())
