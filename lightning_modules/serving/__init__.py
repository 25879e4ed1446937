"""The trained detector on photos and videos: the predictor, the MLflow pyfunc model, ONNX."""
