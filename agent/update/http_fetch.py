"""TUF fetcher over plain HTTP(S), for big fleets behind a CDN or any static file server
serving the repository directory. Target files resume with ``Range`` requests from the
bytes a previous (interrupted) attempt left in ``{resume_dir}/{name}.resume``.

Chosen with ``transport = "http"`` and ``http_base_url`` in the agent config; the device's
byte-rate cap (``transfer_max_bytes_per_s``) applies here too. :meth:`HttpFetcher.stop`
ends a download in progress at the next block and keeps its resume file."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import urllib3
from tuf.api import exceptions as tuf_exc

from edgeship.agent.update.fetcher_base import FetcherInterface  # not tuf.ngclient: ~11 MB until an update
from edgeship.agent.update.transfer import RESUME_SUFFIX, RateLimiter, discard_resume

logger = logging.getLogger(__name__)

BLOCK_BYTES = 64 * 1024


class HttpFetcher(FetcherInterface):
    def __init__(self, resume_dir: Path | None = None, *, timeout_s: float = 30.0,
                 retries: int = 3, max_bytes_per_s: int = 0) -> None:
        self.resume_dir = Path(resume_dir) if resume_dir else None
        self._limiter = RateLimiter(max_bytes_per_s)
        self._stopping = threading.Event()
        self.bytes_resumed = 0
        self.bytes_received = 0
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            retries=urllib3.Retry(total=retries, backoff_factor=0.5, backoff_max=10.0))

    def stop(self) -> None:
        """End the download in progress at its next block (its resume file is kept)."""
        self._stopping.set()

    def _resume_path(self, url: str) -> Path | None:
        if self.resume_dir is None or "/targets/" not in url:
            return None
        return self.resume_dir / (quote(url.split("/targets/", 1)[1], safe="") +
                                  RESUME_SUFFIX)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if self._stopping.is_set():
            raise tuf_exc.DownloadError("download stopped: the agent is stopping")
        part = self._resume_path(url)
        offset = part.stat().st_size if part is not None and part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self._http.request("GET", url, headers=headers, preload_content=False,
                                      redirect=True)
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"GET {url}: {e}") from e
        if offset and resp.status == 416:  # stale resume file
            resp.release_conn()
            discard_resume(part)
            return self._fetch(url)
        if resp.status not in (200, 206):
            resp.release_conn()
            raise tuf_exc.DownloadHTTPError(f"{resp.status} for {url}", resp.status)
        if resp.status == 200 and offset:  # the server ignored Range: start over
            discard_resume(part)
            offset = 0
        return self._stream(resp, part, offset)

    def _stream(self, resp, part: Path | None, offset: int) -> Iterator[bytes]:
        out = open(part, "ab") if part is not None else None
        keep = False
        try:
            if offset and part is not None:
                with open(part, "rb") as f:
                    data = f.read(offset)
                self.bytes_resumed += len(data)
                yield data
            for block in resp.stream(BLOCK_BYTES):
                if self._stopping.is_set():
                    keep = True
                    raise tuf_exc.DownloadError("download stopped: the agent is stopping")
                self._limiter.acquire(len(block))
                if out is not None:
                    out.write(block)
                    out.flush()
                self.bytes_received += len(block)
                yield block
        except (urllib3.exceptions.HTTPError, OSError) as e:
            keep = True  # network trouble: the next attempt resumes with Range
            raise tuf_exc.DownloadError(f"download interrupted: {e}") from e
        finally:
            resp.release_conn()
            if out is not None:
                out.close()
                if not keep:
                    discard_resume(part)
