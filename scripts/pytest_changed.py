"""Run the test files among the changed paths; when only package code changed, the fast core tests."""

import subprocess
import sys
from pathlib import Path

FAST = ["tests/test_masks.py", "tests/test_layout.py", "tests/test_flow.py", "tests/test_validation.py"]

changed = [Path(p) for p in sys.argv[1:]]
tests = sorted({str(p) for p in changed if p.parts[:1] == ("tests",) and p.name.startswith("test_")})
if not tests and any(p.parts[:1] == ("transfusion_pytorch",) for p in changed):
    tests = FAST
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", *tests]) if tests else 0)
