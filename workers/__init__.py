"""fraudscore: streaming fraud scoring on Kafka and gRPC with Feast features and ONNX Runtime."""

# Fix prometheus-client's value storage before anything can import Feast: feast 0.67 switches
# prometheus-client to multiprocess mode at import time (see workers/features/store.py), and
# the choice is made once, when prometheus_client.values is first imported.
import prometheus_client.values  # noqa: F401

__version__ = "0.1.0"
