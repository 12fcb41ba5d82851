"""`baton.v1.PrefixIndexService`: how workers feed a router's in-process index over gRPC."""

from __future__ import annotations

from prefix_index.memory import InProcessPrefixIndex
from proto.baton.v1 import kv_events_pb2, kv_events_pb2_grpc


class PrefixIndexServicer(kv_events_pb2_grpc.PrefixIndexServiceServicer):
    """Applies each published batch to the router's in-process index."""

    def __init__(self, index: InProcessPrefixIndex) -> None:
        self.index = index

    async def Publish(self, request, context):  # noqa: N802 - gRPC method name
        return kv_events_pb2.PublishAck(resync=await self.index.apply(request))


SERVICE_NAME = kv_events_pb2.DESCRIPTOR.services_by_name["PrefixIndexService"].full_name
ADD_TO_SERVER = kv_events_pb2_grpc.add_PrefixIndexServiceServicer_to_server
