"""control layer: Alembic migrations of the controller's schema (run by ``db.open_database``)."""
