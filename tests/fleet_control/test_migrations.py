"""Schema migrations: a registry file made by the release before migrations is upgraded in
place with its data; every backend ends at the head revision with the schema of
fleet.schema; opening a current registry changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import inspect, text

from edgeship.fleet import migrations
from edgeship.fleet.db import single_use
from edgeship.fleet.registry import Registry
from edgeship.fleet.schema import metadata

FIXTURE = Path(__file__).parent / "fixtures" / "registry-v0.db"


def _schema_diff(target) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    engine = single_use(target)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    # SQLite reports FLOAT/REAL and server defaults loosely: compare tables, columns, indexes
    return [d for d in diff if not (isinstance(d, list) or d[0] in ("modify_default",))]


def test_a_registry_made_before_migrations_is_upgraded_in_place(tmp_path):
    db = tmp_path / "fleet.db"
    shutil.copyfile(FIXTURE, db)
    assert migrations.current(single_use(db)) is None  # no version table yet
    reg = Registry(db)
    assert migrations.current(reg.db.engine) == migrations.head()
    devices = {d.id: d for d in reg.devices()}
    assert sorted(devices) == ["pi-0", "pi-1", "pi-2"]
    pi0, pi1, pi2 = devices["pi-0"], devices["pi-1"], devices["pi-2"]
    assert (pi0.profile, pi0.group, pi0.tags, pi0.running("digits")) == \
        ("rpi4", "north", ("canary", "lab"), 2)  # the serving event's version
    assert not pi2.online and pi1.desired == {"digits": 2}
    # columns added by the migration, filled in from the reports already stored
    assert (pi0.last_event, pi1.last_event, pi2.last_event) == ("serving", "failed", "rejected")
    assert (pi1.last_failure, pi2.last_failure, pi0.last_failure) == \
        ("health_check_failed", "bad_signature", None)
    assert (pi0.cpu_percent, pi0.temperature_c) == (12.5, 51.0)
    assert abs(pi0.memory_percent - 100 * (1 - 2900 / 3800)) < 1e-9
    assert [(d.device, d.hold) for d in reg.desired()] == [("pi-0", False), ("pi-1", True)]
    assert reg.rollout("r-fixture")["state"] == "halted"
    assert reg.lease("rollout-runner")[0] == "host-1-123"
    assert [e["action"] for e in reg.audit_log()] == ["rollout.start", "rollout.halted"]
    assert len(reg.events()) == 3 and reg.latest_telemetry("pi-1")["device"] == "pi-1"
    assert reg.releases("digits")[-1] == ("digits", 2, 1_699_999_500.0, "ci")
    assert reg.install_outcomes("digits", 2, 0) == {
        "pi-0": ("serving", None), "pi-1": ("failed", "health_check_failed")}
    _, changed = reg.set_desired("pi-0", "digits", 1)
    assert changed and reg.desired("pi-0")[0].seq == 3  # continues the fleet's sequence
    reg.close()
    assert _schema_diff(db) == []
    Registry(db).close()  # a current registry: opening it again changes nothing
    assert migrations.current(single_use(db)) == migrations.head()


def test_every_backend_gets_the_head_schema(registry_target):
    Registry(registry_target).close()
    assert _schema_diff(registry_target) == []
    assert migrations.current(single_use(registry_target)) == migrations.head()


def test_a_registry_created_before_hold_existed_gains_the_column(registry_target):
    engine = single_use(registry_target)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE desired (device TEXT NOT NULL, model TEXT NOT NULL, "
                          "version INTEGER NOT NULL, seq INTEGER NOT NULL, rollout TEXT, "
                          "updated_at REAL NOT NULL, PRIMARY KEY (device, model))"))
        conn.execute(text("INSERT INTO desired VALUES ('pi-1', 'digits', 1, 4, NULL, 5.0)"))
    engine.dispose()
    reg = Registry(registry_target)
    [kept] = reg.desired()
    assert (kept.version, kept.seq, kept.hold) == (1, 4, False)
    held, changed = reg.set_desired("pi-1", "digits", 2, hold=True)
    assert changed and held.hold and held.seq == 5
    reg.close()


def test_data_written_at_the_baseline_survives_the_upgrade(registry_target):
    engine = single_use(registry_target)
    migrations.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO devices (id, online, last_seen, models) VALUES "
                          "('pi-1', 1, 5.0, :m)"), {"m": '{"digits": {"version": 3}}'})
        conn.execute(text("INSERT INTO events (device, ts, event, model, version, reason, "
                          "raw) VALUES ('pi-1', 6.0, 'failed', 'digits', 4, 'disk_full', "
                          "'{}')"))
    assert "api_tokens" not in inspect(engine).get_table_names()
    engine.dispose()
    reg = Registry(registry_target)
    [dev] = reg.devices()
    assert (dev.running("digits"), dev.last_failure, dev.last_event_ts) == (3, "disk_full", 6.0)
    reg.close()
    assert _schema_diff(registry_target) == []
