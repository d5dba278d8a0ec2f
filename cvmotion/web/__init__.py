"""web layer: the portal, a client of the REST API."""
