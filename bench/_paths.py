"""Imported first by every bench script: the project's root on sys.path, and bench/ itself off it.

`python bench/X.py` puts bench/ first on sys.path, where bench/queue.py (named as issue 5 asks) would stand in for
the standard library's `queue` in every later import (torch, concurrent.futures, ...).
"""

import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
