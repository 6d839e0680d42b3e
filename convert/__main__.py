"""`python -m convert SRC DST [--dtype ...] [--overwrite] [--quiet]`: exit 0 on success, 2 on a checkpoint
that cannot be converted (the reason on stderr as `error: ...`, no traceback)."""

from __future__ import annotations

import argparse
import sys

from convert.converter import convert
from convert.readers import ConversionError
from internvl_jax.config import SUPPORTED_DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an InternVL checkpoint directory (HF-native or original OpenGVLab layout; "
                    "safetensors or PyTorch .bin, single or sharded) into internvl_jax Flax weights.")
    parser.add_argument("src", help="checkpoint directory holding config.json and the weights")
    parser.add_argument("dst", help="directory to create (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None,
                        help="dtype of the converted weights (default: the checkpoint's, from config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    except (ConversionError, OSError) as error:
        # ConfigError is turned into ConversionError by the converter; OSError covers unreadable files
        # and full disks. Anything else is a bug and keeps its traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
