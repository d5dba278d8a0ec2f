"""cli layer: the ``cvmotion`` command line."""
