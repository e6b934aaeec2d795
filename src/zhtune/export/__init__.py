"""Export models for other runtimes (GGUF for llama.cpp, Ollama, LM Studio)."""
