"""tunelab engine: everything that is not UI (imports no gradio)."""

__version__ = "0.1.0"
