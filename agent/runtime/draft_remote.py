"""A draft model on another process or node: a draft server, and the head's client for it.

A small or spare machine can draft for a pipeline: a runner with role "draft" loads the draft
model (`draft_model.DraftModel`, unpaced) and answers proposal requests on one link from the
head, framed like the stage links (`links.py`: a length header, a msgpack header, a raw array
payload). The head's `RemoteDraft` offers what the speculator asks of a local `DraftModel`
(`propose`, `paused`, `retain`, `feedback`), paces each sequence itself, and sends each
sequence's tokens once (then only what was added). A sampled sequence sends a subkey of its own
random key, so seeded runs still reproduce; the reply carries the draft's q for sampled rows as
float32. A draft server that breaks or stops answering turns remote drafting off for the
head's lifetime (said once on stderr): the target keeps serving, undrafted.
"""

from __future__ import annotations

import os
import select
import sys
from typing import Any

import mlx.core as mx
import msgspec
import numpy as np

from agent.generation import SamplingParams
from agent.runtime.draft_model import DraftModel, DraftRow, PacedRows, Proposal, Want
from agent.runtime.links import _LEN, StageLink, StageLinkError, _from_bytes, _to_bytes
from agent.runtime.sampling import RowSampler

# A draft server's answer for a batch of rows must come within this (a draft that cannot keep
# up is worse than none: the head then decodes without it).
PROPOSE_TIMEOUT_S = 10.0


class RemoteWant(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    start: int  # where `tokens` go in the sequence's token list (what the server has so far)
    tokens: list[int]
    limit: int
    params: SamplingParams | None = None  # None: greedy
    key: list[int] | None = None  # a subkey of the sequence's random key (uint32 words)


class ProposeRequest(msgspec.Struct, frozen=True, kw_only=True):
    vocab: int
    live: list[str]  # the sequences still running: the server frees the others' rows
    wants: list[RemoteWant]


class RemoteProposal(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tokens: list[int]
    sampled: bool = False  # its q rows are in the payload, in order


class ProposeReply(msgspec.Struct, frozen=True, kw_only=True):
    proposals: list[RemoteProposal]
    shape: list[int] = []
    dtype: str = "float32"


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(ProposeRequest)
_reply_decoder = msgspec.msgpack.Decoder(ProposeReply)


def _send(link: StageLink, header: Any, payload: bytes = b"") -> None:
    data = _encoder.encode(header)
    try:
        link.sock.sendall(_LEN.pack(len(data), len(payload)) + data + payload)
    except OSError as exc:
        raise StageLinkError(f"lost the draft link: {exc}") from exc


def _recv(link: StageLink, decoder: Any, timeout: float | None) -> tuple[Any, bytes]:
    link.sock.settimeout(timeout)
    header_size, payload_size = _LEN.unpack(link._exactly(_LEN.size))
    header = decoder.decode(link._exactly(header_size))
    return header, link._exactly(payload_size) if payload_size else b""


# ---- the server (a runner with role "draft") ---------------------------------------------------


class DraftServer:
    """Answers one head's proposal requests with a local, unpaced `DraftModel`."""

    def __init__(self, decoder: Any, *, compiled: bool = True) -> None:
        self.decoder = decoder
        self.compiled = compiled
        self.model: DraftModel | None = None
        self.tokens: dict[str, list[int]] = {}

    def answer(self, request: ProposeRequest) -> tuple[ProposeReply, bytes]:
        if self.model is None:
            self.model = DraftModel(self.decoder, vocab=request.vocab, compiled=self.compiled,
                                    paced=False)
        live = set(request.live)
        self.tokens = {k: v for k, v in self.tokens.items() if k in live}
        self.model.retain(live)
        wants = []
        for w in request.wants:
            known = self.tokens.setdefault(w.id, [])
            del known[w.start:]
            known.extend(w.tokens)
            sampler = None
            if w.params is not None:
                sampler = RowSampler(msgspec.structs.replace(w.params, seed=None))
                if w.key is not None:
                    sampler.key = mx.array(w.key, dtype=mx.uint32)
            wants.append(Want(w.id, list(known), w.limit, sampler))
        proposals = self.model.propose(wants)
        out, qs = [], []
        for w in request.wants:
            got = proposals.get(w.id)
            if got is None:
                continue
            out.append(RemoteProposal(id=w.id, tokens=got.tokens, sampled=got.q is not None))
            if got.q is not None:
                qs.append(got.q[:len(got.tokens)])
        if not qs:
            return ProposeReply(proposals=out), b""
        q = mx.concatenate(qs)
        payload, dtype = _to_bytes(q.astype(mx.float32))
        return ProposeReply(proposals=out, shape=list(q.shape), dtype=dtype), payload


def serve_drafts(server: DraftServer, link: StageLink, control_fd: int) -> int:
    """A draft runner's loop: answer the head until it or the agent goes away (or the agent
    says shut down)."""
    from agent.runtime.protocol import FrameBuffer, Shutdown, to_runner_decoder

    frames = FrameBuffer()
    while True:
        readable, _, _ = select.select([link, control_fd], [], [], 5.0)
        if control_fd in readable:
            data = os.read(control_fd, 1 << 16)
            if not data:
                return 0
            if any(isinstance(to_runner_decoder.decode(body), Shutdown)
                   for body in frames.feed(data)):
                return 0
        if link not in readable:
            continue
        try:
            request, _ = _recv(link, _request_decoder, None)
        except StageLinkError:
            return 0  # the head is gone: its instance is being replaced
        reply, payload = server.answer(request)
        try:
            _send(link, reply, payload)
        except StageLinkError:
            return 0


# ---- the head's client ------------------------------------------------------------------------


class RemoteDraft(PacedRows):
    """A draft model behind a link, as the speculator uses a local `DraftModel`."""

    def __init__(self, link: StageLink, *, vocab: int, name: str = "draft",
                 timeout: float = PROPOSE_TIMEOUT_S) -> None:
        self.link: StageLink | None = link
        self.vocab = vocab
        self.name = name
        self.timeout = timeout
        self.rows: dict[str, DraftRow] = {}  # pace only (their `row` is unused)
        self.sent: dict[str, int] = {}  # tokens of each sequence the server holds
        self.live: set[str] = set()

    def paused(self, seq_id: str, tokens: int) -> bool:
        if self.link is None:
            return True
        state = self.rows.get(seq_id)
        return state is not None and state.paused_at(tokens)

    def retain(self, live: set[str]) -> None:
        self.live = set(live)
        for gone in [s for s in self.rows if s not in live]:
            self.rows.pop(gone, None)
            self.sent.pop(gone, None)

    def propose(self, wants: list[Want]) -> dict[str, Proposal]:
        if self.link is None:
            return {}
        remote = []
        for w in wants:
            if w.limit <= 0 or self.paused(w.id, len(w.tokens)):
                continue
            state = self.rows.setdefault(w.id, DraftRow(row=-1))
            start = min(self.sent.get(w.id, 0), len(w.tokens))
            params = key = None
            if w.sampler is not None:
                params = w.sampler.params
                sub = w.sampler.next_key()
                key = None if sub is None else np.asarray(sub).astype(np.uint32).tolist()
            remote.append(RemoteWant(id=w.id, start=start, tokens=w.tokens[start:],
                                     limit=min(w.limit, state.draft_len), params=params,
                                     key=key))
            self.sent[w.id] = len(w.tokens)
        if not remote:
            return {}
        request = ProposeRequest(vocab=self.vocab, live=sorted(self.live | {w.id for w in remote}),
                                 wants=remote)
        try:
            _send(self.link, request)
            reply, payload = _recv(self.link, _reply_decoder, self.timeout)
        except StageLinkError as exc:
            print(f"flock runner: remote draft model {self.name} is not used any more: {exc}",
                  file=sys.stderr)
            self.link.close()
            self.link = None
            return {}
        q = _from_bytes(payload, reply.shape, reply.dtype) if payload else None
        out: dict[str, Proposal] = {}
        at = 0
        for p in reply.proposals:
            rows = None
            if p.sampled and q is not None:
                rows = q[at:at + len(p.tokens)]
                at += len(p.tokens)
            out[p.id] = Proposal(list(p.tokens), rows)
        return out

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


def connect_remote_draft(address: str, *, vocab: int, name: str, deadline: float,
                         timeout: float) -> RemoteDraft:
    """The head's client for the draft server at `address` (retried until `deadline`)."""
    link = StageLink.connect(address, deadline=deadline, timeout=timeout)
    return RemoteDraft(link, vocab=vocab, name=name)

