"""host layer: the host daemon (host API, owns the VMs and the migration engine of one host)."""
