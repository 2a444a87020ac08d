"""The Open Inference Protocol (KServe v2, as Triton speaks it): REST and gRPC adapters over one data plane."""
