#!/usr/bin/env python3
"""Checks a daemon's gRPC health and reflection services with another gRPC
implementation (grpcio, its health-checking and reflection packages), as
grpc_health_probe and grpcurl would.

Usage: grpc_check.py ADDR CA CERT KEY SERVICE METHOD

Exits 0 when: health answers SERVING for "" and SERVICE, NOT_FOUND for an
unknown name; reflection lists SERVICE and the health service, and the
descriptor it returns for SERVICE has METHOD. Exits 1 with the reason
otherwise, 77 when grpcio is not installed.
"""

import sys

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    from google.protobuf.descriptor_pool import DescriptorPool
except ImportError as error:
    print(f"grpcio not available: {error}", file=sys.stderr)
    sys.exit(77)


def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)


def main():
    addr, ca, cert, key, service, method = sys.argv[1:7]
    with open(ca, "rb") as f:
        roots = f.read()
    with open(cert, "rb") as f:
        chain = f.read()
    with open(key, "rb") as f:
        private = f.read()
    credentials = grpc.ssl_channel_credentials(roots, private, chain)
    with grpc.secure_channel(addr, credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)

        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", service]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                fail(f"health of {name!r}: {reply.status}")
        try:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
            fail("an unknown service had a health status")
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                fail(f"unknown service: {error.code()}")

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        listed = {s.name for reply in replies for s in reply.list_services_response.service}
        for name in [service, "grpc.health.v1.Health"]:
            if name not in listed:
                fail(f"reflection does not list {name}: {sorted(listed)}")

        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        methods = [m.name for m in pool.FindServiceByName(service).methods]
        if method not in methods:
            fail(f"{service} has no {method}: {methods}")
    print(f"{addr}: health SERVING, reflection lists {len(listed)} services, {service}.{method} described")


if __name__ == "__main__":
    main()
