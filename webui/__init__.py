"""tunelab web UI (Gradio)."""
