"""A llama.cpp GGUF file's tokenizer -> Hugging Face's tokenizer.json and tokenizer_config.json.

A GGUF has no tokenizer.json; it has `tokenizer.ggml.model` ("gpt2" = byte-level BPE),
the vocabulary, the merges, a type per token (CONTROL tokens such as `<|im_start|>` are
matched whole and are special) and `tokenizer.ggml.pre`, the name of llama.cpp's
pre-tokenizer (the regex that splits text before BPE; see `src/llama-vocab.cpp`). We
rebuild the same pipeline with the `tokenizers` library. The result must give the token
ids of transformers' own GGUF loader (`transformers/integrations/gguf`), which
tests/test_pull.py checks. `refllm.weights.gguf_to_hf.convert` writes the files.
"""

from __future__ import annotations

from refllm.errors import LLMRuntimeError

# ---------------------------------------------------------------------------------------
# tokenizer.json
# ---------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by `tokenizer.ggml.pre`.
# GPT-2's split is exactly the regex of tokenizers' ByteLevel(use_regex=True).
_GPT2_FAMILY = {"gpt-2", "gpt2", "mpt", "olmo", "jais"}  # llama.cpp spells it "gpt-2"
# "default", and a file without `tokenizer.ggml.pre` (llama.cpp then warns "GENERATION
# QUALITY WILL BE DEGRADED" and uses "default"): four regexes applied in turn, each
# splitting the pieces the previous one left, matches and the text between them alike
# (`unicode_regex_split`): punctuation runs, then GPT-2's split, then digit runs, then
# three-digit groups.
_DEFAULT_SPLITS = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
# "smollm" (and starcoder, refact, command-r, codeshell, exaone) first cut every digit
# out on its own (`\p{N}`), then apply GPT-2's split: Digits(individual) + ByteLevel,
# which is also how SmolLM2's own tokenizer.json is built.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_FAMILY = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType values


def pre_tokenizer(pre: str, add_prefix_space: bool = False):
    """The `tokenizers` pre-tokenizer equal to llama.cpp's for `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True, use_regex=True)
    if pre == "default":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _DEFAULT_SPLITS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True, use_regex=False)])
    if pre in _GPT2_FAMILY:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_FAMILY:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True, use_regex=False),
        ])
    raise LLMRuntimeError(f"GGUF pre-tokenizer {pre!r} is not supported by the converter")


def _byte_level_spelling(token: str, alphabet: set[str], byte_to_char: dict[int, str]) -> str:
    """A vocabulary entry in the byte-level alphabet (some files store plain text instead)."""
    if set(token) <= alphabet:
        return token
    return "".join(byte_to_char[b] for b in token.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` equal to the GGUF's byte-level BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LLMRuntimeError(f"GGUF tokenizer model {kind!r}; the converter builds byte-level BPE ('gpt2') only")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    byte_to_char = _bytes_to_unicode()
    alphabet = set(byte_to_char.values())

    # CONTROL and USER_DEFINED tokens are plain text (llama.cpp matches them whole in the
    # raw input and prints them as they are; its converter writes added tokens decoded),
    # every other token is spelled in the byte-level alphabet.
    raw = {i for i, k in enumerate(types) if k in (CONTROL, USER_DEFINED)}
    vocab = {(t if i in raw else _byte_level_spelling(t, alphabet, byte_to_char)): i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise LLMRuntimeError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                               continuing_subword_prefix="", end_of_word_suffix="", dropout=None))
    tok.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"),
                                      bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    tok.decoder = decoders.ByteLevel()

    # CONTROL tokens are special (matched whole, skipped when decoding with
    # skip_special_tokens), whatever their spelling (`<|im start|>` has a space: it is
    # still a control token to llama.cpp); USER_DEFINED ones are matched whole but are
    # text. (The ByteLevel decoder maps a Latin-1 letter of such a token, `é`, to its
    # byte: a user-defined "café" decodes wrong. llama.cpp prints it as it is.)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    # BOS/EOS are added by the post-processor only if the file asks for it (SmolLM2: neither).
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]] if add_bos else None
        eos = tokens[meta["tokenizer.ggml.eos_token_id"]] if add_eos else None
        pre_a = f"{bos}:0 " if bos else ""
        post_a = f" {eos}:0" if eos else ""
        pre_b = f" {bos}:1" if bos else ""
        post_b = f" {eos}:1" if eos else ""
        ids = {bos: meta.get("tokenizer.ggml.bos_token_id"), eos: meta.get("tokenizer.ggml.eos_token_id")}
        specials = [(t, int(ids[t])) for t in dict.fromkeys(x for x in (bos, eos) if x)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{pre_a}$A:0{post_a}", pair=f"{pre_a}$A:0{post_a}{pre_b} $B:1{post_b}", special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(meta: dict, max_length: int) -> dict:
    """tokenizer_config.json: the chat template and the special tokens as strings."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # i.e. "use tokenizer.json as it is"
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    config = {k: v for k, v in config.items() if v is not None}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def eos_token_ids(meta: dict) -> int | list[int] | None:
    """generation_config.json's eos_token_id: the EOS, and the end-of-turn and
    end-of-message tokens llama.cpp also ends a generation at (`tokenizer.ggml.eot_token_id`,
    `eom_token_id`; Llama-3-Instruct's <|eot_id|>, Llama 3.1's <|eom_id|>)."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = list(dict.fromkeys(int(meta[k]) for k in keys if meta.get(k) is not None))
    return None if not ids else ids[0] if len(ids) == 1 else ids
