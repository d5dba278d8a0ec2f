"""cvmotion: confidential live migration for SEV-SNP-style confidential VMs.

The secure processor is emulated (there is no SEV-SNP hardware here); its formats are byte-exact AMD.
"""

from __future__ import annotations

import os

# numpy's OpenBLAS starts a thread per core at import that spins ~100 ms waiting for work, in every daemon, SP
# and VM process (measured: 10 ticks of CPU in the idle thread). cvmotion uses no BLAS; on two cores a new VM or
# standby process started during a migration took that from the pipeline. Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__all__ = ["__version__"]

__version__ = "0.1.0"
