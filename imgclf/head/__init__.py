"""The attention head on cached features: the model and its training.

Modules are imported by their full path (imgclf.head.<module>); nothing is re-exported here, so
importing one module never pulls in another (or TensorFlow) and dvc.yaml's deps stay exact."""
