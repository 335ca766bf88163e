"""The frozen backbones and their one pass over the images: registry, precision, engines, store.

Modules are imported by their full path (imgclf.features.<module>); nothing is re-exported here, so
importing one module never pulls in another (or TensorFlow) and dvc.yaml's deps stay exact."""
