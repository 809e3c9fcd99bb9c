"""Device sinks: where fetched bytes end up (CpuShmSink now; CudaSink on GPU hosts)."""
