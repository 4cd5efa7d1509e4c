"""Standard gRPC services a deployment relies on: health checking and reflection."""
from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

CALL_TIMEOUT_S = 30.0


def test_health_reports_serving_and_reflection_lists_the_api(rabbitmq, launcher):
    server = launcher.server(rabbitmq.url)
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "qm.v1.TaskQueue"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service

        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "qm.v1.TaskQueue" in services
        assert "grpc.health.v1.Health" in services
        api = DescriptorPool(database).FindServiceByName("qm.v1.TaskQueue")
        assert {method.name for method in api.methods} >= {"SubmitTask", "GetTaskStatus", "StreamTaskResults"}
