"""Generated protobuf and gRPC stubs of protos/deltaserve/v1 (regenerate with ``python protos/build.py``)."""
from .deltaserve.v1 import (common_pb2, deltas_pb2, deltas_pb2_grpc, inference_pb2, inference_pb2_grpc, tenants_pb2,
                            tenants_pb2_grpc)

__all__ = ["common_pb2", "deltas_pb2", "deltas_pb2_grpc", "inference_pb2", "inference_pb2_grpc", "tenants_pb2",
           "tenants_pb2_grpc"]
