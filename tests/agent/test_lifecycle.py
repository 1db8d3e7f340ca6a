import pytest
from hypothesis import given, strategies as st

from agent.lifecycle import (TRANSITIONS, Event, RecordStore, State, TransitionError,
                             UpdateRecord, next_state)


def test_happy_path_visits_every_step_in_order():
    r = UpdateRecord("digits").begin(2)
    for ev in (Event.DOWNLOADED, Event.VERIFIED, Event.CHECK, Event.HEALTHY, Event.PASSED,
               Event.DONE):
        r = r.advance(ev)
    assert list(r.history) == ["idle", "downloading", "verifying", "staged", "health_check",
                               "trial", "committed", "idle"]


@pytest.mark.parametrize("state", [State.DOWNLOADING, State.VERIFYING, State.STAGED,
                                   State.HEALTH_CHECK, State.SHADOW, State.TRIAL])
def test_an_error_in_any_in_flight_state_rolls_back_then_fails(state):
    assert next_state(state, Event.ERROR) == State.ROLLING_BACK
    assert next_state(State.ROLLING_BACK, Event.ROLLED_BACK) == State.FAILED


@given(st.sampled_from(list(State)), st.sampled_from(list(Event)))
def test_unknown_pairs_raise_and_known_pairs_follow_the_table(state, event):
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) == TRANSITIONS[(state, event)]
    else:
        with pytest.raises(TransitionError):
            next_state(state, event)


def test_records_survive_a_round_trip_on_disk(tmp_path):
    store = RecordStore(tmp_path)
    r = UpdateRecord("digits").begin(3).advance(Event.DOWNLOADED)
    store.save(r)
    assert store.load("digits") == r
    assert [p.name for p in tmp_path.iterdir()] == ["digits.json"]  # no temp files left


def test_a_corrupt_record_reads_as_failed_not_as_a_crash(tmp_path):
    (tmp_path / "digits.json").write_text("{not json")
    assert RecordStore(tmp_path).load("digits").state == State.FAILED
