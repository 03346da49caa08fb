"""What `refllm bench` runs: the prompt, the sentences, the engines' and tasks' names.

Every engine gets the same work: the first PROMPT_TOKENS token ids of PROMPT (BOS
included), then DECODE_TOKENS greedy steps; SENTENCES, EMBED_PASSES times over, one at
a time and EMBED_BATCH at a time. The streams task decodes STREAM_STEPS steps of n
sequences at once, each after the same prompt, for each n of STREAM_COUNTS.
"""

from __future__ import annotations

from pathlib import Path

PROMPT_TOKENS = 128
DECODE_TOKENS = 128
EMBED_BATCH = 32
EMBED_PASSES = 4  # passes over SENTENCES per timed round (a round of one batch is too short to time well)

# A fixed English prompt, long enough for 128 tokens with any sensible BPE vocabulary.
PROMPT = (
    "The history of computing is a story of machines that learned to remember. Early "
    "calculators could add and multiply, but they forgot each result as soon as it was "
    "read. The stored-program computer changed that: instructions and data lived in the "
    "same memory, and a program could rewrite itself. Over the following decades memory "
    "grew from a few thousand words of magnetic core to billions of bytes of dynamic RAM, "
    "while the time to fetch a word shrank far more slowly than the time to compute with "
    "it. Today the speed of many programs, including the language models that answer our "
    "questions, is set less by arithmetic than by how fast weights can be streamed from "
    "memory into the processor. A model with one hundred million parameters in single "
    "precision must read four hundred megabytes for every token it writes, and so the "
    "memory bus, not the multiplier, decides how quickly the words appear on the screen."
)

# Short sentences, as a search index or a chat memory embeds them.
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The cat sits outside.",
    "A new movie is so great.", "The new movie is awesome.", "How do I reset my password?",
    "What is the weather like in Paris today?", "Serverless functions start in milliseconds.",
    "The quick brown fox jumps over the lazy dog.", "I forgot my umbrella at the station.",
    "Please send me the quarterly report by Friday.", "Water boils at one hundred degrees Celsius.",
    "She plays the piano every evening.", "The train to Berlin is delayed by ten minutes.",
    "Neural networks learn from examples.", "My phone battery dies too quickly.",
    "The museum opens at nine in the morning.", "He ordered a coffee with oat milk.",
    "Spin runs WebAssembly components.", "The library closes early on Sundays.",
    "Our team won the final match.", "Add two cups of flour and stir gently.",
    "The river flooded after the storm.", "Can you recommend a good book on history?",
    "Memory bandwidth limits token generation.",
]


STREAM_COUNTS = (1, 2, 4, 8)  # concurrent sequences, `refllm bench --streams`
STREAM_STEPS = 32  # decode steps of all the streams per timed round
STREAM_MODES = ("invariant", "throughput")  # Llama.decode_batch's modes


REFLLM = "refllm (NumPy)"
LLAMA_CPP = "llama.cpp F32"
TRANSFORMERS = "transformers f32"
SENTENCE_TRANSFORMERS = "sentence-transformers"


ALL_ENGINES = (REFLLM, LLAMA_CPP, TRANSFORMERS, SENTENCE_TRANSFORMERS)
DEFAULT_TASKS = ("prefill", "decode", "embed", "memory")
ALL_TASKS = (*DEFAULT_TASKS, "streams")  # streams: refllm alone, by `--streams` or `--tasks streams`


def streams_task(n: int, mode: str) -> str:
    """The task name of n streams in `mode` ("streams 8 invariant"), as the engine
    processes are sent it; `parse_streams_task` reads it back."""
    return f"streams {n} {mode}"


def parse_streams_task(task: str) -> tuple[int, str] | None:  # -> (n, mode), None for another task
    words = task.split()
    if len(words) != 3 or words[0] != "streams":
        return None
    return int(words[1]), words[2]


def prompt_ids(model_dir, n: int = PROMPT_TOKENS) -> list[int]:
    """The first `n` token ids of PROMPT (BOS included), repeated if the text is short."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(PROMPT, add_special_tokens=True).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]
