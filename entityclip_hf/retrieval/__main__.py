"""`python -m entityclip_hf.retrieval`: the entityclip-search command."""

import sys

from .cli import main

sys.exit(main())
