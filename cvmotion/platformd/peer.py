"""platformd: who is on the other end of the platform socket — the emulation's stand-in for "hardware".

On SEV-SNP the secure processor writes a guest's pages only into memory the RMP assigns to that guest,
encrypted with the guest's key, and a VM's vCPUs run only the guest the hardware was launched with.  Here the
"hardware" is a VM process (``python -m cvmotion.vmd``) that hands the platform its memfd, and the untrusted
daemon can connect to the same socket.  So the platform binds hardware to guests itself and accepts a
``vm_attach`` only from a peer that is a VM process for that VM, by its kernel-reported credentials
(``SO_PEERCRED``, not anything the peer says): a daemon that attaches memory it made (and can read) is refused.

Limit (README, emulation boundary): a process of the same user can still run the genuine VM process and read
its memory through ``/proc``; this check closes the *protocol* path, as the design asks, not the OS one.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from cvmotion.errors import UsageError

__all__ = ["VM_PROCESS_MODULE", "check_vm_peer", "peer_pid"]

VM_PROCESS_MODULE = "cvmotion.vmd"
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a Unix stream socket, as the kernel recorded it."""
    pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(pid)


def check_vm_peer(sock: socket.socket, name: str) -> None:
    """Refuse unless the peer runs ``python -m cvmotion.vmd --dir .../<name>`` (``UsageError``).

    A warm standby (``--standby``, started before its VM existed) learns its name when the daemon configures
    it; it is accepted for any name because it is the same genuine VM process and attaches once, as the VM it
    became (the daemon chose that name for a cold VM process too, through ``--dir`` and ``vm.json``).
    """
    pid = peer_pid(sock)
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        raise UsageError(f"vm_attach {name!r}: the peer (pid {pid}) is gone") from None
    args = [a.decode(errors="replace") for a in argv if a]
    ok = len(args) >= 3 and args[1:3] == ["-m", VM_PROCESS_MODULE]
    directory = args[args.index("--dir") + 1] if ok and "--dir" in args[:-1] else ""
    if not ok or (Path(directory).name != name and "--standby" not in args):
        raise UsageError(f"vm_attach {name!r}: the peer (pid {pid}) is not the VM process of {name!r}")
