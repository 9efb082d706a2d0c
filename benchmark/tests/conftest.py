import sys
from pathlib import Path

# The benchmark scripts are plain files, not a package: import them by path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
