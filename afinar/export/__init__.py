"""Merging in 16 bits, GGUF and its quantizers, the Ollama Modelfile, model cards and the push to the Hub."""
