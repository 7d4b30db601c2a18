"""modelserve edge pipeline: simulator -> router -> RUL classifier -> Avro writer / upstream.

Every module talks through :mod:`modelserve_edge.transport` and never knows whether it runs as an
Azure IoT Edge module (edgeHub routes) or as a systemd service on a local MQTT broker.
"""

__version__ = "1.0.0"
