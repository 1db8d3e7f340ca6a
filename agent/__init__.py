"""edgeship agent: runs on the device. Imports neither torch nor the converter or fleet."""

__version__ = "0.1.0"
