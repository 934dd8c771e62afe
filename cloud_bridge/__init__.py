"""The cloud bridge: the gRPC service an edge device escalates to (``cloud-bridge serve``)."""
