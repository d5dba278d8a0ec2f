"""agent layer: the migration agent inside the TEE (RA-TLS, migration policy, session keys)."""
