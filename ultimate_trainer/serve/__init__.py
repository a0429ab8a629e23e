"""serve.py (:8083): an OpenAI-compatible API over the models training produces (docs/SERVING.md)."""
