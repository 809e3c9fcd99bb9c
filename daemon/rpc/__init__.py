"""The gRPC layer: the Loader service, admission, the stream of load events, peers."""
