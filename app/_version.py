"""The installed distribution's version, for logs, the OpenAPI document and build_info."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vortex-vram")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
