"""Dataset tools: `python -m llava.data.check` validates a training dataset and fixes wrong image extensions."""
