"""The download contract python-tuf's ``Updater`` drives, without importing ``tuf.ngclient``.

``tuf.ngclient`` pulls in its metadata API, securesystemslib's signers and cryptography
(~11 MB of RSS on an idle agent that has no update to run). Its ``Updater`` only calls
``download_file`` / ``download_bytes`` on the fetcher it is given, so the agent's fetchers
derive from this base, which has the same public behaviour as
``tuf.ngclient.FetcherInterface`` (tuf 7): implement ``_fetch``; errors that are not
``DownloadError`` are wrapped in one; more than ``max_length`` bytes raises
``DownloadLengthMismatchError``. ``tuf.api.exceptions`` is light (no ngclient, no crypto).
``tuf.ngclient`` is imported only when an update runs (``agent.updater``).
"""

from __future__ import annotations

import abc
import logging
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

from tuf.api import exceptions as tuf_exc

logger = logging.getLogger(__name__)


class FetcherInterface(abc.ABC):
    """A network download for TUF: subclasses implement ``_fetch`` only."""

    @abc.abstractmethod
    def _fetch(self, url: str) -> Iterator[bytes]:
        """The contents of ``url`` as chunks; ``DownloadHTTPError`` for an error status."""

    def fetch(self, url: str) -> Iterator[bytes]:
        try:
            return self._fetch(url)
        except tuf_exc.DownloadError:
            raise
        except Exception as e:
            raise tuf_exc.DownloadError(f"Failed to download {url}") from e

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """A temporary file holding ``url``'s contents, at most ``max_length`` bytes."""
        received = 0
        with tempfile.TemporaryFile() as temp_file:
            for chunk in self.fetch(url):
                received += len(chunk)
                if received > max_length:
                    raise tuf_exc.DownloadLengthMismatchError(
                        f"Downloaded {received} bytes exceeding the maximum allowed length "
                        f"of {max_length}")
                temp_file.write(chunk)
            logger.debug("downloaded %d of at most %d bytes from %s", received, max_length,
                         url)
            temp_file.seek(0)
            yield temp_file

    def download_bytes(self, url: str, max_length: int) -> bytes:
        with self.download_file(url, max_length) as f:
            return f.read()

    def stop(self) -> None:
        """The agent is stopping: end a download in progress (keeping what resumes it).
        Nothing to do for a fetcher whose downloads end with their connection."""
