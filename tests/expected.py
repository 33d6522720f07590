"""What the test suite expects of the installed transformers, in one place:
how many rotary classes exist, and how many rope_patch must answer from
tables. Keyed by transformers major version."""

import transformers

MAJOR = int(transformers.__version__.split(".")[0])

#: Fewest rotary classes a scan must find: transformers 4.57.6 ships 110, 5.24.0 ships 227.
MIN_CLASSES = {5: 200, 4: 101}[MAJOR]
#: Fewest classes answered from tables (the contract test's count).
MIN_CACHED = {5: 180, 4: 86}[MAJOR]
#: Fewest M-RoPE classes whose 3-D calls are answered from tables.
MIN_CACHED_MROPE = {5: 20, 4: 9}[MAJOR]
#: Families that must be answered from tables, by class name.
MUST_CACHE = {
    5: [
        "LlamaRotaryEmbedding",
        "Qwen3RotaryEmbedding",
        "Gemma3RotaryEmbedding",
        "Olmo3RotaryEmbedding",
        "Lfm3RotaryEmbedding",
        "DeepseekV4RotaryEmbedding",
        "OlmoRotaryEmbedding",
        "Ernie4_5RotaryEmbedding",
        "CohereRotaryEmbedding",
        "BltRotaryEmbedding",
        "GptOssRotaryEmbedding",
        "Llama4TextRotaryEmbedding",
        "DeepseekV2RotaryEmbedding",
    ],
    4: [
        "LlamaRotaryEmbedding",
        "Qwen3RotaryEmbedding",
        "Gemma3RotaryEmbedding",
        "OlmoRotaryEmbedding",
        "CohereRotaryEmbedding",
        "GptOssRotaryEmbedding",
        "Llama4TextRotaryEmbedding",
        "DeepseekV2RotaryEmbedding",
    ],
}[MAJOR]
