"""Golden sets: what refllm's float64 reference computes for a suite of cases, written
so that another project can check itself against it without refllm.

    write_golden(out_dir, models_root=None)      the built-in suite on the default models
    write_golden(out_dir, suite="cases.jsonl",   a user's suite on a user's Llama-family
                 models=Models.from_paths(PATH)) checkpoint (safetensors dir or .gguf)
    write_golden(..., ray="host:6379")           the cases spread over a Ray cluster
    load_golden(dir)                             read one back (`Golden`: header + cases)
    builtin_golden_dir(models_root=None)         the built-in set, generated on demand
                                                 into a cache directory and reused

    refllm golden --out DIR                                  (the built-in suite)
    refllm golden --model PATH --suite cases.jsonl --out DIR [--ray [ADDRESS]]
    refllm conform --against URL --golden DIR                (replays any golden set)

The package, one job a module:

    reader.py   the format: load_golden, Golden, the JSON helpers (needs no model)
    FORMAT.md   the golden format's specification (copied into every golden set)
    suite.py    the built-in suite and a user's suite file (SUITE.md, suite.schema.json)
    models.py   the models a run uses, by name: a models root, or a user's paths
    record.py   running one case: the float64 numbers of its golden line
    writer.py   running a suite and writing the directory
    fanout.py   the same run over a Ray cluster (optional: pip install 'refllm[ray]')
    cache.py    the built-in set, cached
"""

from .cache import KEEP_CACHED, builtin_golden_dir, builtin_key, golden_cache_root
from .models import Models, Source, manifest_sha256, model_files, sha256_file
from .reader import (FORMAT, FORMAT_DOC, FORMAT_VERSION, GOLDEN_FILE, PARAM_FIELDS, Golden, decode_float,
                     encode_float, load_golden, params_from_json, params_to_json)
from .record import COMPUTE_MODULES, TOP_N, CaseError, compute_digest, record, top_logits
from .suite import (ALL, BUILTIN, EMBEDDER, LLM, QUICK, SUITE, SUITE_FORMAT_VERSION, SUITE_SCHEMA, SUITE_VERSION,
                    CaseSpec, SuiteError, describe, load_suite, select)
from .writer import RNG, build_header, write_golden

__all__ = ["write_golden", "load_golden", "builtin_golden_dir", "Golden", "CaseSpec", "BUILTIN", "QUICK",
           "params_to_json", "params_from_json", "encode_float", "decode_float", "golden_cache_root", "select",
           "load_suite", "describe", "SuiteError", "CaseError", "Models", "Source", "record", "build_header", "builtin_key",
           "LLM", "EMBEDDER", "ALL", "TOP_N", "RNG", "FORMAT", "FORMAT_VERSION", "FORMAT_DOC", "GOLDEN_FILE",
           "PARAM_FIELDS", "SUITE", "SUITE_VERSION", "SUITE_FORMAT_VERSION", "SUITE_SCHEMA", "KEEP_CACHED",
           "COMPUTE_MODULES", "compute_digest", "sha256_file", "model_files", "manifest_sha256", "top_logits"]
