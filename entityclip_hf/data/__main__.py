"""`python -m entityclip_hf.data NAME --root DIR`: load a dataset and print its report."""

from .cli import main

raise SystemExit(main())
