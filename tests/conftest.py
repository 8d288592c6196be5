import sys
from pathlib import Path

# Make tests/gguf_blocks.py importable as a plain helper module.
sys.path.insert(0, str(Path(__file__).parent))
