"""`python -m medlava.kernels`: build the CPU kernels now rather than on first use (make setup does)."""

import logging

from medlava.kernels import ops

logging.basicConfig(level=logging.INFO, format="%(message)s")
print("medlava CPU kernels:", "ready" if ops() is not None else "unavailable (the portable torch code will run)")
