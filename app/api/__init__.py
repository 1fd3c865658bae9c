"""The embedded HTTP control plane. The core never imports this package."""

from app.api.main import create_app
from app.api.server import ControlPlane, ControlPlaneError, start_control_plane

__all__ = ["ControlPlane", "ControlPlaneError", "create_app", "start_control_plane"]
