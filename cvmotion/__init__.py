"""cvmotion: confidential live migration for SEV-SNP-style confidential VMs.

The secure processor is emulated (there is no SEV-SNP hardware here); its formats are byte-exact AMD.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
