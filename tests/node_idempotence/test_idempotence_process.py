"""Issue 7 against real node processes: producer ids (InitProducerId) and the partition leader's
idempotence checks (DESIGN.md §8)."""

from __future__ import annotations

import time

import grpc
from support.nodes import LocalCluster
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto.common_pb2 import ErrorCode

DEADLINE_S = 60.0


def _init_producer_id(address: str) -> api_pb2.InitProducerIdResponse:
    deadline = time.monotonic() + DEADLINE_S
    with grpc.insecure_channel(address) as channel:
        while True:
            try:
                answer = api_pb2_grpc.BrokerStub(channel).InitProducerId(api_pb2.InitProducerIdRequest(), timeout=15)
            except grpc.RpcError:
                answer = None
            if answer is not None and answer.error == ErrorCode.NONE:
                return answer
            assert time.monotonic() < deadline, answer
            time.sleep(0.1)


def test_producer_ids_are_unique_across_nodes_and_restarts(cluster3: LocalCluster) -> None:
    seen: list[int] = []
    for _ in range(3):
        for node in cluster3.nodes:
            answer = _init_producer_id(node.address)
            assert answer.producer_epoch == 0
            seen.append(answer.producer_id)
    assert len(set(seen)) == len(seen)
    assert all(pid >= 0 for pid in seen)
    cluster3.stop_all()
    for node in cluster3.nodes:
        node.start(wait=False)
    cluster3.wait_ready()
    after = [_init_producer_id(node.address).producer_id for node in cluster3.nodes]
    assert len(set(seen + after)) == len(seen) + len(after)
