"""The gRPC edge: generated CRI code, servicers, conversion and the server on a unix socket.

Only this package imports the generated protobuf code (``crishim.api.v1``).
"""
