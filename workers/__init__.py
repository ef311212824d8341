"""fraudscore: streaming fraud scoring on Kafka and gRPC with Feast features and ONNX Runtime."""

__version__ = "0.1.0"
