"""Judging and using models: evaluation, comparison, significance, plots, predict.

Modules are imported by their full path (imgclf.results.<module>); nothing is re-exported here, so
importing one module never pulls in another (or TensorFlow) and dvc.yaml's deps stay exact."""
