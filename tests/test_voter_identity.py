"""Who a vote counts as, end to end over real gRPC and the real broker: one key cannot outweigh the
other tenants however many user ids it invents, nor spend another tenant's user's rate limit; and
each vote trains once, with its latest value, whichever replica took it, across a trainer restart.

The trainer's side is its join store and `labels_for_update` (what a reward-model update takes),
the gate's its `ThumbsByVersion` (the rollback's evidence), fed from the events Kafka holds; the
models themselves are not needed to see which labels they would be given.
"""

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import CollectorRegistry

from feedback.config import KafkaSettings, SpoolSettings
from feedback.consumer import ConsumedEvent
from feedback.identity import ApiKey, key_digest
from feedback.intake import IntakeLimits
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.v1 import events_pb2, serving_pb2_grpc
from flywheel.v1 import serving_pb2 as pb
from gate.service import ThumbsByVersion
from server.app import FlywheelServer
from server.config import ServerSettings
from tests.test_feedback_rpc import HANG_GUARD_S, consume
from trainer.config import RewardModelSettings
from trainer.join_store import JoinStore
from trainer.loop import labels_for_update

pytestmark = pytest.mark.engine  # it imports server.app, so vLLM: the fast tier does not import this module

SECRET = "voter-test-secret"
SHARE = 0.2
TENANTS = [f"tenant-{n}" for n in range(4)]


def key_of(principal: str) -> tuple[tuple[str, str]]:
    return (("x-api-key", f"key-of-{principal}"),)


def start_replicas(engine_loop, engine, kafka: KafkaSettings, tmp_path, count: int, feedback: IntakeLimits):
    """`count` servers on the shared engine, one token secret, each with its own producer to `kafka`."""
    keys = [ApiKey(principal=p, sha256=key_digest(key_of(p)[0][1])) for p in ["mallory", *TENANTS]]
    replicas = []
    for index in range(count):
        producer = EventProducer(
            kafka, SpoolSettings(directory=tmp_path / f"spool-{index}"), EventMetrics.register(CollectorRegistry())
        )
        engine_loop.run(producer.start())
        settings = ServerSettings(
            port=0, metrics_port=0, feedback_token_secret=SECRET, api_keys=keys, feedback=feedback
        )
        server = engine_loop.run(FlywheelServer.start(settings, engine, events=producer, topics=kafka.topics))
        replicas.append((server, producer))
    return replicas


def stop_replicas(engine_loop, replicas) -> None:
    for server, producer in replicas:
        engine_loop.run(server.stop(0))
        engine_loop.run(producer.stop())


def read_all(kafka: KafkaSettings, generations: int, votes: int) -> list[ConsumedEvent]:
    """Every answer and vote Kafka holds, read from the start as a new consumer group (the trainer after a crash) reads them."""
    return consume(kafka, kafka.topics.generations, generations) + consume(kafka, kafka.topics.feedback, votes)


def into_store(store: JoinStore, events: list[ConsumedEvent]) -> None:
    """What the trainer's `take` does with each event."""
    for consumed in events:
        if isinstance(consumed.event, events_pb2.GenerationLogged):
            store.add_generation(consumed.event)
        else:
            store.add_feedback(consumed.event)


def vote(stub, answer: pb.GenerateResponse, user_id: str, rating, metadata) -> grpc.StatusCode:
    rated = pb.RatedResponse(response_id=answer.response_id, feedback_token=answer.feedback_token)
    try:
        stub.SubmitFeedback(pb.SubmitFeedbackRequest(response=rated, user_id=user_id, rating=rating), metadata=metadata)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def ask(stub, user_id: str, metadata, n: int = 0) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        prompt=f"What is {n % 50}+{n // 50}?", sampling=pb.SamplingParams(max_tokens=1), user_id=user_id
    )
    return stub.Generate(request, metadata=metadata, timeout=HANG_GUARD_S)


def test_one_key_speaking_as_a_thousand_users_stays_within_its_share(engine_loop, engine, kafka_settings, tmp_path):
    limits = IntakeLimits(vote_burst=3, votes_per_minute=1, principal_vote_burst=5000, principal_votes_per_minute=60)
    replicas = start_replicas(engine_loop, engine, kafka_settings, tmp_path, 1, limits)
    try:
        with grpc.insecure_channel(replicas[0][0].address) as channel:
            stub = serving_pb2_grpc.FlywheelStub(channel)
            mallory = key_of("mallory")
            with ThreadPoolExecutor(16) as pool:
                socks = list(pool.map(lambda n: ask(stub, f"sock-{n}", mallory, n), range(1000)))
                verdicts = list(
                    pool.map(lambda a: vote(stub, a[1], f"sock-{a[0]}", pb.RATING_DOWN, mallory), enumerate(socks))
                )
            assert verdicts.count(grpc.StatusCode.OK) == 1000

            # Mallory votes as "ada", acme's real user, until the limit: it is Mallory's ada it limits.
            posing = [ask(stub, "ada", mallory, n) for n in range(5)]
            assert [vote(stub, a, "ada", pb.RATING_DOWN, mallory) for a in posing][
                -1
            ] == grpc.StatusCode.RESOURCE_EXHAUSTED
            tenant_votes = 0
            for tenant in TENANTS:
                for n in range(10):
                    user_id = "ada" if n < 3 else f"user-{n}"  # ada's votes are still hers to give
                    answer = ask(stub, user_id, key_of(tenant), n)
                    assert vote(stub, answer, user_id, pb.RATING_UP, key_of(tenant)) == grpc.StatusCode.OK
                    tenant_votes += 1
    finally:
        stop_replicas(engine_loop, replicas)

    events = read_all(kafka_settings, 1000 + 5 + tenant_votes, 1000 + 3 + tenant_votes)
    store = JoinStore(tmp_path / "join.sqlite3", ttl_seconds=1e9)
    into_store(store, events)
    labels = labels_for_update(store, RewardModelSettings(heldout_fraction=0.0, max_principal_share=SHARE))
    by_principal = [label.principal for label in [*labels.examples, *labels.pairs]]
    assert by_principal.count("mallory") <= SHARE * len(by_principal)
    assert {p for p in by_principal if p != "mallory"} == set(TENANTS)
    store.close()

    thumbs = ThumbsByVersion(max_principal_share=SHARE)
    for consumed in events:
        if isinstance(consumed.event, events_pb2.FeedbackGiven):
            thumbs.add(consumed.event)
    downs, counted = thumbs.counts(0)
    assert downs <= SHARE * counted, "Mallory's thumbs-down are at most its share of the rollback's evidence"
    assert counted >= tenant_votes


def test_flipped_and_repeated_votes_across_replicas_and_a_restart_train_once_with_the_latest_value(
    engine_loop, engine, kafka_settings, tmp_path
):
    replicas = start_replicas(engine_loop, engine, kafka_settings, tmp_path, 2, IntakeLimits())
    settings = RewardModelSettings(heldout_fraction=0.0)
    store_path = tmp_path / "join.sqlite3"
    acme = key_of("tenant-0")
    try:
        with grpc.insecure_channel(replicas[0][0].address) as a, grpc.insecure_channel(replicas[1][0].address) as b:
            first, second = serving_pb2_grpc.FlywheelStub(a), serving_pb2_grpc.FlywheelStub(b)
            answer = ask(first, "ada", acme)
            flips = [(first, pb.RATING_UP), (second, pb.RATING_DOWN), (first, pb.RATING_UP), (second, pb.RATING_UP)]
            assert [vote(stub, answer, "ada", rating, acme) for stub, rating in flips] == [grpc.StatusCode.OK] * 4

            store = JoinStore(store_path, ttl_seconds=1e9)
            into_store(store, read_all(kafka_settings, 1, 4))
            labels = labels_for_update(store, settings)
            assert [(e.answer.response_id, e.thumbs_up) for e in labels.examples] == [(answer.response_id, True)]
            assert not labels.pairs
            store.mark_used(labels.examples, labels.pairs)
            store.close()  # the trainer stops after its checkpoint

            after = [(second, pb.RATING_DOWN), (first, pb.RATING_UP), (second, pb.RATING_UP)]
            assert [vote(stub, answer, "ada", rating, acme) for stub, rating in after] == [grpc.StatusCode.OK] * 3
    finally:
        stop_replicas(engine_loop, replicas)

    restarted = JoinStore(store_path, ttl_seconds=1e9)
    into_store(restarted, read_all(kafka_settings, 1, 7))  # everything again, as after a crash before the commit
    assert labels_for_update(restarted, settings).waiting == 0, "the vote was trained on once"
    restarted.close()
