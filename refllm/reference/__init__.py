"""The plain reference path: both models in the plainest NumPy, for reading and as a
second opinion on the fast path (`refllm.Llama`, `refllm.Bert`).

    from refllm import reference
    model = reference.Llama.from_pretrained(dir, dtype=np.float64)
    logits = model(ids)                          # [T, V], as refllm.Llama
    cache = model.new_cache(64)                  # a list of [NKV, P, HD] arrays per layer
    model(prompt_ids, cache); model.decode(token, cache)
    hidden = reference.Bert.from_pretrained(dir)(ids, mask)   # [B, T, H], as refllm.Bert

Each model is one file that reads top to bottom (`llama.py`, `bert.py`), beside
transformers' modeling_llama.py / modeling_bert.py and llama2.c's run.c. It shares no
code with the fast path beyond the config and the safetensors reader; the tests check
the fast path against it (tests/test_reference.py), and it against transformers.
"""

from .bert import Bert
from .llama import KVCache, Llama

__all__ = ["Llama", "KVCache", "Bert"]
