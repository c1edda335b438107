"""Shared pytest setup: make the repository root importable (``import lmopt``, ``import models``)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
