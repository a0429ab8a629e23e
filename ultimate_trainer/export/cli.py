"""``python export.py``: one model, one format, one folder (docs/EXPORT.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core.checkpoints import MODEL_NAMES_HELP
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.logs import setup_logging
from ultimate_trainer.export import to_gguf
from ultimate_trainer.export.exporter import DTYPES, FORMATS, ExportError, export

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Export a trained model for vLLM, SGLang, llama.cpp or Ollama "
                                             "(docs/EXPORT.md).")
    config_mod.add_arguments(ap)
    ap.add_argument("--model", default="latest", help=f"which model (default: latest): {MODEL_NAMES_HELP}")
    ap.add_argument("--format", required=True, choices=FORMATS,
                    help="hf: merged safetensors folder; adapter: the LoRA adapter + base reference; "
                         "gguf: one GGUF file + Ollama Modelfile")
    ap.add_argument("--quant", default="f16", choices=to_gguf.QUANTS, help="GGUF tensor type (default f16)")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES, help="hf weights' dtype (default bf16)")
    ap.add_argument("--out", metavar="DIR", help="folder to create (default: exports/<model>-<format>-<time>/)")
    ap.add_argument("--base-ref", metavar="NAME",
                    help="adapter: the base name to write in adapter_config.json (a Hub id) instead of copying "
                         "the base weights beside the adapter")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = config_or_none(args)
    if cfg is None:
        return Exit.CONFIG
    from ultimate_trainer.model.loading import ModelError

    try:
        result = export(cfg, args.model, args.format, quant=args.quant, dtype=args.dtype, out=args.out,
                        base_ref=args.base_ref)
    except (ExportError, ModelError, ValueError, to_gguf.GGUFExportError) as e:
        print(f"export: {e}", file=sys.stderr)
        return Exit.CRASH
    print(result.path)
    if result.format == "adapter":
        print((result.path / "SERVING.md").read_text(encoding="utf-8"))
    return Exit.OK
