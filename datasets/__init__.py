"""Dataset sources: one module per format, and the shared encoding."""
