"""Export formats that other tools load without our code: Qwen3 transformers folders, GGUF for llama.cpp and
ollama, and the VLM as a transformers-native image-text model."""
