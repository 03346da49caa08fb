"""Where refllm's weights come from (installed as `refllm.weights`).

    catalog.py     the default models: which package on the Python package index
                   carries each one, and what is inside it
    gguf_to_hf.py  a llama.cpp GGUF file -> a Hugging Face Llama directory
                   (float32 safetensors, config.json, tokenizer.json, chat template)
    hf_to_gguf.py  the inverse: a Hugging Face Llama directory -> an F32 GGUF that
                   llama.cpp runs (the benchmark's and the oracles' llama.cpp peer)
    pull.py        `pull(name)`: download, convert or copy, and move into place
                   atomically in Spin's layout (SPEC.md section 5)
"""
