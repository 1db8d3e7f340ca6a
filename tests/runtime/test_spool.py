"""The telemetry spool: bounded on disk, counted eviction, dead letters, survives reopen."""

from __future__ import annotations

import json

import pytest

from edgeship.agent.spool import SpoolError, SpoolSettings, TelemetrySpool


def _spool(tmp_path, **kw) -> TelemetrySpool:
    return TelemetrySpool(SpoolSettings(tmp_path / "t.db", **kw))


def _rec(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


def test_records_carry_their_sequence_and_leave_only_when_acked(tmp_path):
    spool = _spool(tmp_path)
    seqs = [spool.push(_rec) for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert [json.loads(p)["seq"] for _, p in spool.peek(10)] == [1, 2, 3]
    spool.ack(2)
    assert [s for s, _ in spool.peek(10)] == [1, 3]
    st = spool.stats()
    assert (st.queued, st.acked, st.pushed, st.last_seq) == (2, 1, 3, 3)


def test_full_queue_evicts_oldest_and_counts_them(tmp_path):
    spool = _spool(tmp_path, max_records=5)
    for _ in range(12):
        spool.push(_rec)
    assert [s for s, _ in spool.peek(100)] == [8, 9, 10, 11, 12]
    assert spool.stats().evicted == 7


def test_refused_record_goes_to_dead_letters_and_is_not_retried(tmp_path):
    spool = _spool(tmp_path, max_dead_letters=2)
    for _ in range(4):
        spool.push(_rec)
    for seq in (1, 2, 3):
        spool.dead_letter(seq, 0x87)
    assert [s for s, _ in spool.peek(10)] == [4]
    assert [(s, rc) for s, rc, _ in spool.dead_letters()] == [(2, 0x87), (3, 0x87)]
    assert spool.stats().dead_lettered == 3


def test_queue_counters_and_sequence_survive_reopen(tmp_path):
    spool = _spool(tmp_path, max_records=2)
    for _ in range(5):
        spool.push(_rec)
    spool.ack(4)
    spool.close()
    again = _spool(tmp_path, max_records=2)
    st = again.stats()
    assert (st.queued, st.evicted, st.acked, st.last_seq) == (1, 3, 1, 5)
    assert again.push(_rec) == 6  # never reuses a sequence number, even after deletes


def test_oversized_record_is_refused_and_nothing_is_stored(tmp_path):
    spool = _spool(tmp_path, max_record_bytes=100)
    with pytest.raises(SpoolError):
        spool.push(lambda seq: b"x" * 101)
    assert spool.stats().queued == 0 and spool.stats().pushed == 0


def test_a_record_being_sent_is_never_evicted_under_the_sender(tmp_path):
    spool = _spool(tmp_path, max_records=3)
    for _ in range(3):
        spool.push(_rec)
    claimed = [s for s, _ in spool.claim(2)]
    assert claimed == [1, 2]
    spool.push(_rec)  # full: evicts the oldest *unclaimed* record
    assert [s for s, _ in spool.peek(10)] == [1, 2, 4]
    spool.ack(1)  # delivered, so not counted as evicted
    spool.release()
    spool.push(_rec)
    st = spool.stats()
    assert (st.evicted, st.acked) == (1, 1)
    assert [s for s, _ in spool.peek(10)] == [2, 4, 5]
