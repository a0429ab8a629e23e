#!/usr/bin/env python3
"""Export a trained model: merged safetensors (hf), the LoRA adapter, or GGUF + Ollama Modelfile.
See docs/EXPORT.md.

    python export.py --format hf|adapter|gguf [--model latest|adopted|checkpoint-N|<consolidation>] [--quant f16|q8_0|...] [--out DIR]
"""

import sys

from ultimate_trainer.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
