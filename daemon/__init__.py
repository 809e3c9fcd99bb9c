"""The tensorferry daemon: store -> fetch -> arena -> registry -> gRPC service.

Modules, in data-path order: ``store`` (S3 and local sources), ``safetensors`` (header
parsing), ``planner`` (tensor table -> byte ranges), ``fetch`` (parallel range reads),
``sinks`` (arenas), ``registry`` (resident models and leases), ``service`` (gRPC),
``server`` (process lifecycle). ``config`` reads the configuration.
"""
