"""Loading the model with its LoRA adapter and training it: the engine plan, SFT, preferences, FP8, frozen prefix."""
