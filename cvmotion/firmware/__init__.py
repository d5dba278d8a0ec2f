"""firmware layer: the emulated AMD secure processor (chip identity, keys, KDS, guest contexts, migration)."""
