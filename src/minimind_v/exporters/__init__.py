"""Export formats that other tools load without our code: Qwen3 transformers folders, GGUF for llama.cpp and
ollama, and the VLM as a transformers-native image-text model."""

# GGUF weight types: written directly by the gguf package, or made from an f32 file by llama.cpp's quantiser. Here,
# not in exporters.gguf, so that the export command lists them without the gguf package installed.
DIRECT_QUANTS = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_QUANTS = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANTS = DIRECT_QUANTS + LLAMA_CPP_QUANTS
