"""The GPU path: settings, the CUDA runtime (API, pinned ring, copy engine), the arena
layout of a plan, and the load that fetches through the ring into CUDA arenas.
"""
