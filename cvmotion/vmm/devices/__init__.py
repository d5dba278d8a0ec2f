"""vmm layer: emulated devices (each a class with a ``*State`` snapshot and ``save()``/``restore()``)."""
