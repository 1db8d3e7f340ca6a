"""Every listener of the agent's local API, started and stopped together: HTTP on TCP
(``api_host:api_port``) and on the Unix socket, gRPC (``grpc_enabled``; needs the ``grpc``
extra) on its own Unix socket and an optional TCP port.

A TCP port another process holds does not stop the agent: it says so in one line and keeps
serving on its Unix sockets, which only the agent's user and group can reach (mode 0660 in
the agent's state directory). Clients that must know they talk to the agent use a socket.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable

from edgeship.agent.api import InferenceHTTPServer, InferenceUnixServer
from edgeship.agent.api_limits import ApiLimits
from edgeship.agent.config import AgentConfig
from edgeship.agent.serving import ModelServer

logger = logging.getLogger(__name__)


def api_limits(cfg: AgentConfig) -> ApiLimits:
    return ApiLimits(max_connections=cfg.api_max_connections,
                     idle_timeout_s=cfg.api_idle_timeout_s,
                     max_request_bytes=cfg.max_request_bytes,
                     body_samples=cfg.api_body_samples)


def grpc_available() -> bool:
    return importlib.util.find_spec("grpc") is not None and \
        importlib.util.find_spec("google.protobuf") is not None


class LocalApi:
    def __init__(self, cfg: AgentConfig, models: ModelServer,
                 metrics_text: Callable[[], bytes] | None, *,
                 health_info: Callable[[], dict[str, Any]] | None = None,
                 install_archive: Callable[[Path], dict[str, Any]] | None = None) -> None:
        """``health_info``: extra /healthz fields (both listeners); ``install_archive``:
        the release-archive hand-over (the Unix socket only: the agent's user and group)."""
        self.cfg = cfg
        self.models = models
        self.metrics_text = metrics_text
        self.health_info = health_info
        self.install_archive = install_archive
        self.limits = api_limits(cfg)
        self.tcp: InferenceHTTPServer | None = None
        self.unix: InferenceUnixServer | None = None
        self.grpc: Any = None
        self.problems: list[str] = []  # one line per listener that could not start

    def start(self) -> None:
        cfg = self.cfg
        if cfg.api_socket_path is not None:
            self.unix = InferenceUnixServer(cfg.api_socket_path, self.models,
                                            metrics_text=self.metrics_text, limits=self.limits)
            self.unix.health_info = self.health_info
            self.unix.install_archive = self.install_archive
            self.unix.start()
            logger.info("local API on %s", self.unix.url)
        if cfg.api_enabled:
            self.tcp = self._bind_tcp()
        self._start_grpc()

    def _bind_tcp(self) -> InferenceHTTPServer | None:
        cfg = self.cfg
        try:
            server = InferenceHTTPServer(cfg.api_host, cfg.api_port, self.models,
                                         metrics_text=self.metrics_text, limits=self.limits)
        except OSError as e:
            self._taken(f"{cfg.api_host}:{cfg.api_port}", e, "HTTP API",
                        self.unix.url if self.unix else None)
            return None
        server.health_info = self.health_info
        server.start()
        logger.info("local API on %s", server.url)
        return server

    def _taken(self, where: str, e: OSError, what: str, socket_url: str | None) -> None:
        why = "is taken by another process" if e.errno == errno.EADDRINUSE else \
            f"cannot be bound ({e.strerror or e})"
        line = (f"{what} port {where} {why}: not serving it; anything answering there is "
                f"not this agent. " + (f"Local clients: use {socket_url}" if socket_url
                                       else "No Unix socket is configured (api_socket)"))
        logger.error("%s", line)
        self.problems.append(line)

    def _start_grpc(self) -> None:
        cfg = self.cfg
        if not cfg.grpc_enabled or (cfg.grpc_socket_path is None and not cfg.grpc_port):
            return
        if not grpc_available():
            line = "grpc_enabled is set but grpcio is not installed: pip install " \
                   "'edgeship[grpc]'"
            logger.error("%s", line)
            self.problems.append(line)
            return
        from edgeship.agent.grpc_api import GrpcInferenceServer
        try:
            self.grpc = GrpcInferenceServer(self.models, self.limits,
                                            socket_path=cfg.grpc_socket_path,
                                            host=cfg.grpc_host, port=cfg.grpc_port or None)
        except OSError as e:
            self._taken(f"{cfg.grpc_host}:{cfg.grpc_port}", e, "gRPC", None)
            if cfg.grpc_socket_path is None:
                return
            self.grpc = GrpcInferenceServer(self.models, self.limits,
                                            socket_path=cfg.grpc_socket_path)
        self.grpc.start()
        logger.info("gRPC inference API on %s", ", ".join(self.grpc.urls))

    def stop(self) -> None:
        for server in (self.tcp, self.unix, self.grpc):
            if server is not None:
                server.stop()
