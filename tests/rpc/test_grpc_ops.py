"""Operations surface over real loopback gRPC: health, reflection, TLS, mutual TLS, bearer token."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.rpc.harness import GATED_CUSTOMER, SlowReader, request, service_settings, serving
from workers.proto.fraud.v1 import fraud_pb2_grpc
from workers.rpc.client import ScoringClient, StreamBroken
from workers.rpc.server import SERVICE_NAME

pytestmark = pytest.mark.timeout(30)
TOKEN = "s3cret-token"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 25))


# --- certificates ---------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, san: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 'localhost' and a client certificate, as PEM files."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    files = {"ca": _pem(ca)}
    for role, san in (("server", "localhost"), ("client", "client.local")):
        key = ec.generate_private_key(ec.SECP256R1())
        files[role] = _pem(_cert(role, key, "test-ca", ca_key, ca=False, san=san))
        files[f"{role}_key"] = _pem(key)
    paths = {}
    for name, data in files.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


# --- tests ----------------------------------------------------------------------------


def test_health_serving_then_not_serving_on_shutdown(tmp_path):
    async def scenario():
        async with serving(service_settings(tmp_path), SlowReader()) as service:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                overall = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                scoring = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                await service.health.enter_graceful_shutdown()  # the first step of stop()
                draining = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                return overall.status, scoring.status, draining.status

    serving_status = health_pb2.HealthCheckResponse.SERVING
    assert run(scenario()) == (serving_status, serving_status, health_pb2.HealthCheckResponse.NOT_SERVING)


def test_reflection_describes_the_service_without_the_proto(tmp_path):
    def describe(port: int):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = db.get_services()
            pool = DescriptorPool(db)
            methods = [m.name for m in pool.FindServiceByName(SERVICE_NAME).methods]
            return services, methods

    async def scenario():
        async with serving(service_settings(tmp_path), SlowReader()) as service:
            # The sync reflection client blocks; keep it off the server's event loop.
            return await asyncio.to_thread(describe, service.port)

    services, methods = run(scenario())
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
    assert methods == ["Score", "ScoreBatch", "ScoreStream"]


def test_reflection_v1_describes_the_service_as_grpcurl_asks_for_it(tmp_path):
    """A v1 client (grpcurl, ghz): grpcio-reflection has no v1 module, but v1 is v1alpha's
    protocol under another package, so v1alpha's messages speak it on the v1 method path."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    async def scenario():
        async with (
            serving(service_settings(tmp_path), SlowReader()) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch,
        ):
            call = ch.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            symbol = "fraud.v1.FraudScoring.Score"  # grpcurl describe fraud.v1.FraudScoring.Score
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
            described = await call.read()
            await call.done_writing()
            return listed, described

    listed, described = run(scenario())
    services = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for svc in f.service if svc.name == "FraudScoring" for m in svc.method}
    assert methods == {"Score", "ScoreBatch", "ScoreStream"}


def test_tls_with_token_rejects_unauthenticated_callers(tmp_path, pki):
    settings = service_settings(tmp_path, tls_cert=pki["server"], tls_key=pki["server_key"], bearer_token=TOKEN)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]

    async def scenario():
        async with serving(settings, SlowReader()) as service:
            target = f"127.0.0.1:{service.port}"
            async with grpc.aio.secure_channel(target, credentials, options=options) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as unary_error:
                    await fraud_pb2_grpc.FraudScoringStub(ch).Score(request("x"))
                with pytest.raises(grpc.aio.AioRpcError) as wrong_token:
                    await fraud_pb2_grpc.FraudScoringStub(ch).Score(
                        request("x"), metadata=(("authorization", "Bearer nope"),)
                    )
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            async with ScoringClient(target, credentials=credentials, options=options) as anonymous:
                with pytest.raises(StreamBroken, match="UNAUTHENTICATED"):
                    await anonymous.score_raw(request("x").transaction)
            async with ScoringClient(target, credentials=credentials, token=TOKEN, options=options) as client:
                response = await client.score_raw(request("x").transaction, budget_ms=500)
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                async with grpc.aio.insecure_channel(target) as ch:
                    await fraud_pb2_grpc.FraudScoringStub(ch).Score(request("x"), timeout=2)
            return unary_error.value, wrong_token.value, health, response, plaintext.value

    unary_error, wrong_token, health, response, plaintext = run(scenario())
    assert unary_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong_token.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # health stays open
    assert response.decision.transaction_id == "t-1"
    assert plaintext.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(tmp_path, pki):
    settings = service_settings(tmp_path, tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    options = [("grpc.ssl_target_name_override", "localhost")]
    ca = pki["ca"].read_bytes()
    with_cert = grpc.ssl_channel_credentials(ca, pki["client_key"].read_bytes(), pki["client"].read_bytes())
    without_cert = grpc.ssl_channel_credentials(ca)

    async def scenario():
        async with serving(settings, SlowReader()) as service:
            target = f"127.0.0.1:{service.port}"
            async with grpc.aio.secure_channel(target, with_cert, options=options) as ch:
                ok = await fraud_pb2_grpc.FraudScoringStub(ch).Score(request("m"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async with grpc.aio.secure_channel(target, without_cert, options=options) as ch:
                    await fraud_pb2_grpc.FraudScoringStub(ch).Score(request("m"), timeout=2)
            return ok, refused.value

    ok, refused = run(scenario())
    assert ok.request_id == "m" and ok.WhichOneof("result") == "decision"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_client_helper_matches_concurrent_requests_and_reports_a_broken_stream(tmp_path):
    from workers.codec import transaction_from_proto

    async def scenario():
        async with serving(service_settings(tmp_path), SlowReader()) as service:
            async with ScoringClient(f"127.0.0.1:{service.port}") as client:
                txns = [
                    transaction_from_proto(request("r", txn_id=f"t{i}", amount=10.0 * i).transaction) for i in range(50)
                ]
                decisions = await asyncio.gather(*(client.score(t, budget_ms=1000) for t in txns))
                held = asyncio.create_task(
                    client.score(
                        transaction_from_proto(request("g", customer_id=GATED_CUSTOMER).transaction), budget_ms=5000
                    )
                )
                await asyncio.sleep(0.1)
                client._stream.call.cancel()  # as if the connection dropped
                with pytest.raises(StreamBroken):
                    await held
                again = await client.score(txns[0], budget_ms=1000)  # reconnects on a new stream
            return decisions, again

    decisions, again = run(scenario())
    assert [d.transaction_id for d in decisions] == [f"t{i}" for i in range(50)]
    assert again.transaction_id == "t0"
