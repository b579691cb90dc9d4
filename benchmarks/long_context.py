"""Long-context speed and memory: ours vs mlx-vlm vs a naive full cache, in one process.

Same as `mlx-dsv4 bench`; every flag is passed through. Examples:

    python benchmarks/long_context.py                               # default sizes (1K/8K/32K, V4-Flash dims)
    python benchmarks/long_context.py --contexts 256,1024 --layers 2 # quick look
    python benchmarks/long_context.py --help

mlx-vlm is optional: `pip install 'mlx-dsv4[bench]'`; without it that column is skipped with the reason.
"""

import sys

from mlx_dsv4.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
