"""The spool: order, the size bound, surviving a restart, a torn last record."""

import logging

import pytest

from feedback.config import SpoolSettings
from feedback.spool import Spool, SpoolLockedError, frame


def payloads(count: int, size: int = 100) -> list[bytes]:
    return [f"record {number:06d} ".encode().ljust(size, b".") for number in range(count)]


@pytest.fixture
def settings(tmp_path) -> SpoolSettings:
    return SpoolSettings(directory=tmp_path / "spool", max_bytes=1 << 20, segment_bytes=4096)


def drain(spool: Spool, chunk: int = 7) -> list[bytes]:
    read: list[bytes] = []
    while records := spool.read(chunk):
        read += [record.payload for record in records]
        spool.ack(records[-1].end)
    return read


def test_records_come_back_in_order_across_segments_and_acked_segments_are_deleted(settings):
    spool = Spool(settings)
    written = payloads(200)
    assert spool.append(written[:150]) == 150
    assert len(list(settings.directory.glob("*.seg"))) > 3

    assert drain(spool)[:150] == written[:150]
    assert spool.is_empty
    assert spool.append(written[150:]) == 50
    assert not spool.is_empty
    assert drain(spool) == written[150:]
    assert spool.is_empty and spool.size_bytes == 0
    assert len(list(settings.directory.glob("*.seg"))) == 1


def test_read_does_not_consume_until_ack(settings):
    spool = Spool(settings)
    spool.append(payloads(5))
    first = spool.read(3)
    assert [record.payload for record in spool.read(3)] == [record.payload for record in first]
    spool.ack(first[1].end)
    assert [record.payload for record in spool.read(10)] == payloads(5)[2:]


def test_full_spool_refuses_the_rest_and_warns_once_per_episode(tmp_path, caplog):
    record_bytes = len(frame(payloads(1)[0]))
    spool = Spool(SpoolSettings(directory=tmp_path, max_bytes=10 * record_bytes + 5, segment_bytes=1 << 20))
    with caplog.at_level(logging.WARNING, logger="feedback.spool"):
        assert spool.append(payloads(8)) == 8
        assert spool.append(payloads(5)) == 2
        assert spool.append(payloads(1)) == 0
        assert spool.size_bytes == 10 * record_bytes
        assert len([message for message in caplog.messages if "full" in message]) == 1

        records = spool.read(4)
        spool.ack(records[-1].end)  # the first segment is also the one written to: it stays until all is acked
        drain(spool)
        assert spool.append(payloads(3)) == 3
        assert spool.append(payloads(10)) == 7
    assert len([message for message in caplog.messages if "full" in message]) == 2


def test_a_restarted_spool_replays_what_was_not_acknowledged(settings):
    spool = Spool(settings)
    written = payloads(120)
    spool.append(written)
    records = spool.read(100)
    spool.ack(records[-1].end)
    spool.close()

    replayed = drain(Spool(settings))
    # Deleted segments stay gone; acknowledged records of the partly acknowledged first segment come back.
    assert 20 <= len(replayed) < 120
    assert replayed == written[-len(replayed) :]


def test_a_torn_last_record_is_cut_off_and_appending_goes_on(settings, caplog):
    spool = Spool(settings)
    written = payloads(10)
    spool.append(written)
    spool.close()
    last_segment = max(settings.directory.glob("*.seg"))
    intact_size = last_segment.stat().st_size
    with open(last_segment, "ab") as segment:
        segment.write(frame(b"torn record")[:-3])  # the crash hit mid-write

    with caplog.at_level(logging.WARNING, logger="feedback.spool"):
        reopened = Spool(settings)
    assert any("torn" in message for message in caplog.messages)
    assert last_segment.stat().st_size == intact_size
    reopened.append([b"after the crash"])
    assert drain(reopened) == written + [b"after the crash"]


def test_a_corrupted_last_record_is_ignored(settings):
    spool = Spool(settings)
    spool.append([b"kept", b"flipped"])
    spool.close()
    segment = max(settings.directory.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))

    assert drain(Spool(settings)) == [b"kept"]


def test_one_process_at_a_time(settings):
    spool = Spool(settings)
    with pytest.raises(SpoolLockedError, match="in use"):
        Spool(settings)
    spool.close()
    Spool(settings).close()
