"""From a folder to image lists: scanning, decoding, groups of copies, splits, augmentation transforms.

Modules are imported by their full path (imgclf.data.<module>); nothing is re-exported here, so
importing one module never pulls in another (or TensorFlow) and dvc.yaml's deps stay exact."""
