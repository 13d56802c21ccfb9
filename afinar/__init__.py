"""afinar: afinado LoRA de un modelo pequeño para un asistente académico en español."""

__version__ = "0.1.0"
