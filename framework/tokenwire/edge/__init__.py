"""The web edge: HTTP clients reach the gateway's gRPC services through the same admission.

Every HTTP call is forwarded, in-process, to the gateway's own gRPC server over a
private Unix socket, so it passes exactly the interceptors and per-turn policies a
gRPC call does (authentication, quotas, moderation), not a copy of them.
"""
