"""The data plane: the /v1 resource, the upstream client and the streaming relay."""
