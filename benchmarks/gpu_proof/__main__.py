"""`python3 benchmarks/gpu_proof ...`: the checkout's vitpipe and this package on sys.path, no install."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parents[1]), str(HERE.parent)):  # the checkout (vitpipe) and benchmarks/ (gpu_proof)
    if p not in sys.path:
        sys.path.insert(0, p)
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]  # its modules are gpu_proof.<name>

from gpu_proof.orchestrator import main  # noqa: E402  (after the sys.path fix above)

sys.exit(main())
