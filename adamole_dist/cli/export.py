"""Export a trained adapter for use outside adamole_dist.

    python launch/export.py runs/x/adapter --out exported/ --format peft      # lora: a PEFT LoRA directory
    python launch/export.py runs/x/adapter --out merged/ --merge              # lora: a full HF model folder
    python launch/export.py runs/x/adapter --out bundle/ --format adamole     # any method: adapter + tokenizer

--format peft  PeftModel.from_pretrained(base, DIR) loads it (LoraConfig + PEFT's key names).
--merge        the LoRA folded into the base weights, saved with save_pretrained (safetensors) beside the
               tokenizer: AutoModelForCausalLM.from_pretrained(DIR) loads it without adamole_dist, and vLLM
               or llama.cpp's convert_hf_to_gguf.py read it.
--format adamole  (default) the adapter files, the base model's id/path and the tokenizer (with the chat
               template training used): load it with adamole_dist.from_pretrained(DIR).
Mixtures of experts (adamole, mole_topk, ...) choose experts per token, so only --format adamole applies.
Every export folder gets a model card (README.md with the Hub's YAML front matter).
--out is checked before anything is read: not a training run nor inside one, not the adapter's folder
nor holding it; --overwrite replaces only a folder an earlier export wrote (it lists its files in
.written_files.json) and that holds nothing else. Exit 2 with one line on bad input; Ctrl-C: exit 130.
"""

import argparse
import sys
from pathlib import Path

from adamole_dist.adapters.export import FORMATS, export
from adamole_dist.cli.console import configure_logging, interruptible
from adamole_dist.config.fields import ConfigError
from adamole_dist.run_files.writable import check_output_folder


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter_dir", type=Path, help="adapter directory written by training (runs/<name>/adapter)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (must not exist or be empty)")
    ap.add_argument("--format", choices=FORMATS, default="adamole", help="export form (default: adamole)")
    ap.add_argument("--merge", action="store_true", help="lora only: write a full model with the LoRA merged in")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return ap


@interruptible
def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        check_output_folder(args.out, "--out", overwrite=args.overwrite, inputs=[("adapter", args.adapter_dir)])
        out = export(args.adapter_dir, args.out, fmt=args.format, merge=args.merge, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.adapter_dir} -> {out}" + (" (merged)" if args.merge else f" ({args.format})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
