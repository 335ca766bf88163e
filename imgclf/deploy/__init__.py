"""Trained models out of the project: export to SavedModel, TFLite and ONNX, each checked by its runtime.

Modules are imported by their full path (imgclf.deploy.<module>); nothing is re-exported here, so
importing one module never pulls in another (or TensorFlow)."""
