"""Where resources come from besides the config's own files: the Kubernetes API."""
