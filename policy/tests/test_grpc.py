"""The pack as the Pulumi CLI talks to it: `policy/__main__.py` served over gRPC.

Starts the entry point the CLI runs (from the pack's directory), then calls the
analyzer service the way the engine does: GetAnalyzerInfo, Analyze for each
resource of the prod plan, AnalyzeStack for all of them.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc

from policy.tests.test_pack import plan

PACK_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analyzer() -> Iterator[analyzer_pb2_grpc.AnalyzerStub]:
    server = subprocess.Popen(
        [sys.executable, "__main__.py"], cwd=PACK_DIR, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            yield analyzer_pb2_grpc.AnalyzerStub(channel)
    finally:
        server.kill()  # the process this fixture started, by its handle
        server.wait(timeout=10)


def _resource(r: dict[str, Any]) -> analyzer_pb2.AnalyzerResource:
    properties = struct_pb2.Struct()
    properties.update(r["inputs"])
    return analyzer_pb2.AnalyzerResource(
        type=r["type"], properties=properties, urn=r["urn"], name=r["name"]
    )


def _analyze(stub: analyzer_pb2_grpc.AnalyzerStub, resources: list[dict[str, Any]]) -> list[str]:
    messages = []
    for r in resources:
        one = _resource(r)
        request = analyzer_pb2.AnalyzeRequest(
            type=one.type, properties=one.properties, urn=one.urn, name=one.name
        )
        messages += [d.message for d in stub.Analyze(request).diagnostics]
    stack = analyzer_pb2.AnalyzeStackRequest(resources=[_resource(r) for r in resources])
    messages += [d.message for d in stub.AnalyzeStack(stack).diagnostics]
    return messages


def test_the_cli_sees_seven_mandatory_policies(analyzer: analyzer_pb2_grpc.AnalyzerStub) -> None:
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == "celery-cluster"
    assert len(info.policies) == 7
    mandatory = analyzer_pb2.EnforcementLevel.Value("MANDATORY")
    assert {p.enforcementLevel for p in info.policies} == {mandatory}


def test_the_prod_plan_passes_and_a_bad_change_is_reported(
    analyzer: analyzer_pb2_grpc.AnalyzerStub,
) -> None:
    resources = plan("prod")
    assert _analyze(analyzer, resources) == []
    broken = copy.deepcopy(resources)
    sts = next(r for r in broken if r["type"] == "kubernetes:apps/v1:StatefulSet")
    sts["inputs"]["spec"]["replicas"] = 4
    broken = [r for r in broken if r["name"] != "workers-pdb"]
    messages = _analyze(analyzer, broken)
    assert len(messages) == 2, json.dumps(messages)
    assert any("replicas = 4" in m for m in messages)
    assert any("celery-worker: no PodDisruptionBudget" in m for m in messages)
