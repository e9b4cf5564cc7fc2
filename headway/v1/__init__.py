"""Generated gRPC contract of Headway (package headway.v1); regenerate with `make protos`."""
