"""export.py: a trained model as a merged safetensors folder, a LoRA adapter with a portable base, or GGUF
(docs/EXPORT.md). A process package: it reads checkpoints and consolidations, writes only exports/."""
