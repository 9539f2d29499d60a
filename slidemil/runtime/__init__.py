"""The runtime every app runs models on: runners, the execution plan, and the tile pipeline.

``runners`` (one interface over torch, ONNX Runtime, OpenVINO and TensorRT), ``plan`` (the one place
that resolves backend, device and precision, and builds the runners that ``score``, ``extract``,
``verify``, ``quantize`` and the benchmarks use) and ``pipeline`` (reader threads -> bounded queue of
uint8 batches -> a backbone runner). The apps (feature extraction, scoring, export checks) sit above.
"""
