"""Entry point for `ray job submit -- python jobs/export.py --model CKPT --interpolate 0,0.25,0.5,0.75,1 [...]`."""

import sys

from raysys.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
