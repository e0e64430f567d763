"""`python -m millrace_models` (from models/): the same as models/prepare.py."""

from .cli import run

run()
