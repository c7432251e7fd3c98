"""GGUF export for llama.cpp and Ollama: a LoRA adapter file, or the merged model, with an Ollama Modelfile.

names (HF -> GGUF tensor names, from gguf-py's table), permute (llama.cpp's Q/K row order), encode (the
file's type), metadata (carried from the base), writer (one GGUF file), adapter, merged, modelfile, command.
"""
