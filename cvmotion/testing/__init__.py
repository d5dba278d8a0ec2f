"""testing: shipped adversaries and checks for tests (shipped code never imports this package).

The adversarial hypervisor and what every attack must end with:

- ``adversary``: ``MigrationProxy``, a man in the middle on a host's migration listener (records every byte);
- ``tampering``: tamper policies for it (drop, duplicate, reorder, move, flip, inject, replay, truncate, freeze);
- ``hostcmd``: the daemon's own command interfaces driven directly (platform socket, VM control sockets);
- ``evil``: ``EvilSource``, the shipped migration engine as a compromised source daemon;
- ``canary``: guest-private plaintext read through "hardware" access, and scans of processes for it;
- ``invariants``: single instance, no rollback (memdirty), no lost write (kvstore);
- ``hosts``: real ``cvmotion host serve`` processes with fixed ports, killable and restartable.
"""
