import pytest
from hypothesis import given, strategies as st

from edgeship.agent.errors import TransitionError
from edgeship.agent.update.records import RecordStore
from edgeship.agent.update.table import TRANSITIONS, Event, State, UpdateRecord, next_state


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


@pytest.mark.parametrize("state,after", [
    (State.DOWNLOADING, State.DOWNLOADING), (State.VERIFYING, State.DOWNLOADING),
    (State.STAGED, State.DOWNLOADING), (State.HEALTH_CHECK, State.DOWNLOADING),
    (State.SHADOW, State.DOWNLOADING), (State.TRIAL, State.TRIAL),
    (State.ROLLING_BACK, State.ROLLING_BACK)])
def test_a_restart_resumes_reinstalls_or_finishes_and_is_counted(state, after):
    r = UpdateRecord("digits", version=3, state=state, restarts=1)
    resumed = r.resumed()
    assert resumed.state == after and resumed.restarts == 2
    assert resumed.history[-1] == after.value


def test_blocked_versions_outlive_later_updates_and_old_records_still_load(tmp_path):
    store = RecordStore(tmp_path)
    r = UpdateRecord("digits").begin(2, previous_version=1).block(2)
    r = r.advance(Event.ERROR).advance(Event.ROLLED_BACK).advance(Event.DONE).begin(3, 1)
    assert r.is_blocked(2) and not r.is_blocked(3) and r.restarts == 0
    store.save(r)
    assert store.load("digits") == r
    (tmp_path / "old.json").write_text('{"schema": 1, "model": "old", "version": 4, '
                                       '"state": "idle", "reason": null, "updated_at": 0, '
                                       '"history": ["idle"]}')
    assert store.load("old").blocked == () and store.load("old").version == 4
    (tmp_path / ".digits.json.x1.tmp").write_text("half")
    assert [p.name for p in store.clean_temp()] == [".digits.json.x1.tmp"]


def test_fault_plan_fires_once_per_update_at_the_last_point_at_the_latest():
    from tests.install.faults import FaultInjectedError, parse_fault_plan

    plan = parse_fault_plan("min_version=2;seed=1;staged:error:0")
    plan.point("staged", 1, last=True)  # below min_version: nothing
    plan.point("staged", 2)  # probability 0: not before the last point
    with pytest.raises(FaultInjectedError):
        plan.point("staged", 2, last=True)
    plan.point("staged", 2, last=True)  # once per update
    with pytest.raises(FaultInjectedError):
        plan.point("staged", 3, last=True)
    with pytest.raises(ValueError):
        parse_fault_plan("staged:explode")


def test_a_hold_ends_in_held_and_the_commit_goes_through_the_trial():
    r = UpdateRecord("digits").begin(4, previous_version=3, hold=True)
    for ev in (Event.DOWNLOADED, Event.VERIFIED, Event.CHECK, Event.HOLD):
        r = r.advance(ev)
    assert r.state == State.HELD and r.hold
    c = r.advance(Event.COMMIT)
    assert c.state == State.COMMIT and not c.hold  # from here an update like any other
    for ev in (Event.SWITCH, Event.PASSED, Event.DONE):
        c = c.advance(ev)
    assert list(c.history) == ["idle", "downloading", "verifying", "staged", "health_check",
                               "held", "commit", "trial", "committed", "idle"]
    d = r.advance(Event.DISCARD).advance(Event.DONE)
    assert d.history[-3:] == ("held", "discard", "idle") and d.previous_version == 3


def test_a_restart_while_held_restages_without_counting_against_the_loop_breaker():
    r = UpdateRecord("digits", version=4, state=State.HELD, hold=True, restarts=0)
    resumed = r.resumed()
    assert resumed.state == State.DOWNLOADING and resumed.hold and resumed.restarts == 1
    again = resumed
    for ev in (Event.DOWNLOADED, Event.VERIFIED, Event.CHECK, Event.SHADOW, Event.HOLD):
        again = again.advance(ev)
    assert again.state == State.HELD and again.restarts == 0  # resting: a new count


@pytest.mark.parametrize("state", [State.COMMIT, State.DISCARD, State.REVERT])
def test_commit_discard_and_revert_are_done_again_after_a_restart(state):
    assert next_state(state, Event.RESUME) == state


def test_a_revert_goes_back_without_a_download_and_an_error_in_it_rolls_back():
    r = UpdateRecord("digits", version=3).begin(1, previous_version=3, event=Event.REVERT)
    assert r.state == State.REVERT and r.history == ("idle", "revert")
    assert r.advance(Event.DONE).state == State.IDLE
    assert r.advance(Event.ERROR).state == State.ROLLING_BACK
    with pytest.raises(TransitionError):
        UpdateRecord("digits", state=State.HELD).advance(Event.START)


def test_records_with_a_hold_round_trip_and_old_ones_read_as_no_hold(tmp_path):
    store = RecordStore(tmp_path)
    r = UpdateRecord("digits").begin(2, hold=True)
    store.save(r)
    assert store.load("digits") == r and store.load("digits").hold
    (tmp_path / "old.json").write_text('{"schema": 2, "model": "old", "version": 4, '
                                       '"state": "idle", "reason": null, "updated_at": 0, '
                                       '"history": ["idle"], "blocked": [], '
                                       '"previous_version": null, "restarts": 0}')
    assert store.load("old").hold is False
