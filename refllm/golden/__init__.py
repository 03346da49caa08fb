from ._old import *  # noqa: F401,F403  (temporary during the split)
from ._old import LLM, EMBEDDER, TOP_N, select, builtin_key, GOLDEN_FILE, FORMAT, FORMAT_VERSION, SUITE, SUITE_VERSION  # noqa: F401
