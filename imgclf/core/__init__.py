"""Shared plumbing: user errors, logging, atomic file output, seeding.

Modules are imported by their full path (imgclf.core.<module>); nothing is re-exported here, so
importing one module never pulls in another (or TensorFlow) and dvc.yaml's deps stay exact."""
