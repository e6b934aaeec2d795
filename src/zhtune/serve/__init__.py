"""``zhtune serve``: an OpenAI-compatible API and a web chat page over the inference engine."""
