"""``vortex-vram``: a client of a Director's control plane (status, top, models, cleanup,
dump, frag).

It talks HTTP only and imports nothing from the monitor: a refresh costs the Director one
request, never a lock held from here.
"""

from app.cli.main import main

__all__ = ["main"]
