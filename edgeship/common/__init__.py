"""Code the host and the device share: the MQTT session (the only module that imports paho),
atomic files, and loading typed settings from TOML. Imports nothing of the fleet or the
converter; of the agent only its wire contract (``edgeship.agent.errors``)."""
