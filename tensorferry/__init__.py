"""tensorferry: stream model weights from object storage into shared GPU or CPU arenas.

The worker-side API lives in `tensorferry.client`; the daemon in `tensorferry.daemon`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
