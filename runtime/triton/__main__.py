"""`python -m sparsevlm.runtime.triton ...`: the same as `sparsevlm-triton ...`."""

import sys

from .cli import main

sys.exit(main())
