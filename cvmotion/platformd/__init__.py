"""platformd: the platform process (secure processor + migration agent service) and its typed protocol."""
