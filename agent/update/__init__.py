"""The update machinery of the agent, in one place.

- ``table``: every state an update can be in, the transition table and the record (pure).
- ``records``: where records are persisted (atomically, before each step).
- ``planner``: what to install next, from announcements and desired state (pure).
- ``desired``: the fleet's newest command per model, persisted (``desired.json``).
- ``driver``: one action per state, rollback, recovery after a restart.
- ``steps``: health check, warm-up, shadow run, trial watch (the runtime work).
- ``download``: TUF-verified download into staging; ``transfer``, ``http_fetch`` and
  ``fetcher_base``: the MQTT and HTTP transports under it.
- ``observer``: what the driver tells an observer at each point (no-op in the product).
- ``worker``: the update thread (locks, waits) around planner and driver.
- ``settings``: device traits and install settings.
"""
