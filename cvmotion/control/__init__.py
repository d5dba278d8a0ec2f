"""control layer: the fabric controller (inventory, placement, policy, maintenance, events, REST)."""
