"""The HTTP streaming client to a peer's head runner (`POST /cluster/generate`, signed).

A request whose instance's head runs on another node is sent there as msgpack; the events come
back as length-prefixed msgpack frames and are decoded straight into the request's stream.
Whatever goes wrong on the way (a refusal, a cut connection, a stream that ends without its
last event) becomes a `Failed` event naming the node, never an exception or a hang.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import httpx
import msgspec

from agent.cluster.peers import base_url, signed_headers
from agent.cluster.state import NodeProfile
from agent.generation import Failed, Finished, GenerationEvent, GenerationRequest
from agent.runtime.protocol import FrameBuffer
from agent.serving.router import RemoteStream

GENERATE_PATH = "/cluster/generate"
_event_decoder = msgspec.msgpack.Decoder(GenerationEvent)


class RemoteHeads:
    """Opens streams to peers' head runners, signed as this node."""

    def __init__(self, client: httpx.AsyncClient, secret: str | None,
                 node_id: Callable[[], str]) -> None:
        self.client = client
        self.secret = secret
        self.node_id = node_id  # read at each request: the node may rekey

    def stream_to(self, profile: NodeProfile, instance_id: str | None = None) -> RemoteStream:
        # Which replica headed on the peer runs it (several may share a node); signed with it.
        target = GENERATE_PATH + (f"?instance={quote(instance_id)}" if instance_id else "")
        url = base_url(profile.addresses[0], profile.api_port) + target

        async def stream(request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
            body = msgspec.msgpack.encode(request)
            headers = signed_headers(self.secret, self.node_id(), "POST", target, body)
            try:
                async with self.client.stream("POST", url, content=body,
                                              headers=headers) as response:
                    if response.status_code != 200:
                        await response.aread()
                        yield Failed(id=request.id, code="internal",
                                     message=f"node {profile.name} refused: "
                                             f"{response.status_code} {response.text[:200]}")
                        return
                    frames = FrameBuffer()
                    async for chunk in response.aiter_bytes():
                        for frame_body in frames.feed(chunk):
                            event = _event_decoder.decode(frame_body)
                            yield event
                            if isinstance(event, Finished | Failed):
                                return
            except httpx.HTTPError as exc:
                yield Failed(id=request.id, code="internal",
                             message=f"lost node {profile.name} serving the model: {exc}")
                return
            yield Failed(id=request.id, code="internal",
                         message=f"node {profile.name} ended the stream early")

        return stream
