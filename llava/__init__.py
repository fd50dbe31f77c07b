"""llava: train and serve LLaVA-style vision-language models."""

__version__ = "1.3.0"
