"""``python -m vislens.organism train --out DIR`` (same as ``vislens organism``)."""
import sys

from .cli import main

sys.exit(main())
