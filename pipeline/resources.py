"""What this machine can give a job: the one notion of available memory, and peak use."""

from __future__ import annotations

import os
import resource


def available_memory() -> int:
    """Bytes a new allocation can take without swapping: Linux's MemAvailable (free memory
    plus caches the kernel can drop), or the free pages where /proc/meminfo is missing.

    Example:
        >>> available_memory() > 0
        True
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
