"""Entry point for `ray job submit -- python jobs/mine.py --input s3://.../pairs.parquet --out s3://.../mined.parquet [...]`."""

import sys

from raysys.cli import main

if __name__ == "__main__":
    sys.exit(main(["mine", *sys.argv[1:]]))
