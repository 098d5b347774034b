"""The ds4tp.v1 worker protocol: messages (`pb`) and gRPC glue built from the service descriptor.

`proto/ds4tp/v1/worker.proto` is the source of truth; `worker_pb2.py` is generated from it by
`python -m ds4tp.proto_gen`. Instead of grpcio-tools' `_pb2_grpc.py` (which refuses grpcio
runtimes older than the tools that wrote it), the client stub and the server registration below
walk the service descriptor, so they follow the .proto with no generated code to keep in step.
"""
from __future__ import annotations

import grpc

from ds4tp.rpc import worker_pb2 as pb

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_CURRENT
SERVICE = pb.DESCRIPTOR.services_by_name["Worker"]
# Exit status of a worker asked to restart (EX_TEMPFAIL): supervisors (ds4tp launch, systemd
# Restart=on-failure) start it again, and it re-joins a fresh process group.
RESTART_EXIT_CODE = 75


def _message_class(desc):
    return getattr(pb, desc.name)


def _path(method) -> str:
    return f"/{SERVICE.full_name}/{method.name}"


class WorkerStub:
    """Client for one worker: one attribute per RPC (Info, Health, Prefill, Decode, Release,
    Shutdown), each a unary-unary callable of `channel` (a grpc or grpc.aio channel)."""

    def __init__(self, channel):
        for m in SERVICE.methods:
            setattr(self, m.name, channel.unary_unary(
                _path(m),
                request_serializer=_message_class(m.input_type).SerializeToString,
                response_deserializer=_message_class(m.output_type).FromString))


def add_worker_servicer(server, servicer) -> None:
    """Register `servicer` (an object with one method per RPC taking (request, context)) on
    a grpc server."""
    handlers = {}
    for m in SERVICE.methods:
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=_message_class(m.input_type).FromString,
            response_serializer=_message_class(m.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
