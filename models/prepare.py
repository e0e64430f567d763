#!/usr/bin/env python3
"""Millrace model preparation: the entry point that scripts/prepare-models.sh runs.

The code is the millrace_models package beside this file (its docstring is the overview);
`python models/prepare.py --help` lists the flags.
"""

from millrace_models.cli import run

if __name__ == "__main__":
    run()
