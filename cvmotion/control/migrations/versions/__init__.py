"""control layer: the schema revisions, oldest first."""
