"""attestation layer: verify (signatures, chain) -> validate (policy) -> token. Imports only abi."""
