"""zhtune: turn a LLaMA-family model into a good Chinese model and assistant."""

__version__ = "0.1.0"
