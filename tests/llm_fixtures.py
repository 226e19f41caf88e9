"""The tests' tiny models: bench/tiny_model.py builds them (the benches use them too, and nothing
under bench/ imports tests/)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from tiny_model import TRAIN_PROMPTS, build_tiny_model, build_tokenizer  # noqa: E402, F401
