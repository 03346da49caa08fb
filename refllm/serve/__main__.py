"""`python -m refllm.serve [options]`: the same server as `refllm serve`."""

import sys

from .app import main

sys.exit(main())
