"""The entry layer: the ``mlops`` command line and the resource sizing read by the k8s manifests."""
