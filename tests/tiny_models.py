"""A tiny random decoder with a real byte-level BPE tokenizer, in Spin's layout.

Used by the generation, API and CLI tests, which need a whole model directory (config,
weights, tokenizer, chat template) but not a real model's quality.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.llama_util import make_tiny_llama

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Héllo wörld, naïve café — ünïcödé 你好世界 🙂 emoji.",
    "def f(x):\n    return x * 2  # code\n",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(path: Path) -> int:
    """Train a 320-token byte-level BPE with <s> (BOS, added) and </s> (EOS); its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    tok.save(str(path))
    return tok.get_vocab_size()


def make_tiny_llm(root: Path, name: str = "tiny", seed: int = 0, context: int = 64, eos_token_id=1) -> Path:
    """<root>/llama/<name>/ with a random 2-layer GQA model and the tokenizer above."""
    d = Path(root) / "llama" / name
    d.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(d / "tokenizer.json")
    make_tiny_llama(d, dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                            max_position_embeddings=context, bos_token_id=0, eos_token_id=eos_token_id), seed=seed)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}))
    return d
