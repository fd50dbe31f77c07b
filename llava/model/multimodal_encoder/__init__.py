"""Vision towers: any Hugging Face vision encoder that returns hidden states, registered by model type."""
