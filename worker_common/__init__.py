"""What the worker services share: engine arguments, request/response conversion, the gRPC
server with health and reflection, and Prometheus metrics."""
