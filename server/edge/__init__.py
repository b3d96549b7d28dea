"""The gRPC edge: everything between a call on the wire and the engine or the store (D9, D10).

    grpc_server.py     create_server(app): the three services, health, reflection, the error interceptor
    grpc_inference.py  InferenceServicer: Generate (server streaming)
    grpc_deltas.py     DeltasServicer: upload (client stream), get, list, delete, preload
    grpc_tenants.py    TenantsServicer (admin keys): create, list, delete, rotate key, set quotas
    auth.py            API-key authentication and the admin role
    rate_limits.py     RateLimiter: per-tenant token buckets and concurrency caps, checked at admission
    errors.py          the one mapping of typed errors (delta_store/errors.py) to gRPC status codes
"""
