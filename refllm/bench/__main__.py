"""`python -m refllm.bench`, the same as `refllm bench`."""

import sys

from .cli import main

sys.exit(main())
