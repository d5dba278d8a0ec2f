"""ipc: plumbing between the processes of one host (Unix-socket RPC). Imports nothing above cvmotion.errors."""
