"""PyContinual-style entry point: `accelerate launch run.py --backbone bert_adapter --baseline ctr`.

Same flags as `mmcl run`.
"""
import sys

from mmcl.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
