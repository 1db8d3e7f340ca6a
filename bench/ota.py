"""``scripts/bench-ota``: over-the-air delivery numbers on this machine.

1. MQTT transfer throughput on loopback for a 20 MB file (fleet server → TUF fetcher) vs the
   same bytes published raw by paho through the same broker;
2. bytes re-sent after a forced disconnect (broker restart) at 50 %;
3. delta size vs full for (a) the digits CNN with only the last layer retrained and (b)
   all-MiniLM-L6-v2 with a retrained classification head, with the time and peak memory to
   apply each delta (in a fresh process, as the device would).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BLOB_BYTES = 20 * 1024 * 1024


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- 1 + 2: MQTT throughput and resume ------------------------------------------------------
#
# Fairness: both sides of each comparison go through the same Mosquitto, at QoS 1, with the
# same payload size (one chunk per message), into a real subscriber that receives every
# byte. The sender runs in its own process in both cases, as it would in production (the
# fleet server is `edgeship fleet serve`; the raw publisher a small paho script), so the
# fetch is not charged for a fleet server sharing the device's GIL. The receiver (the
# device's TUF fetcher / the raw subscriber) runs here. Rounds alternate raw and fetch, so
# both see the same background load; the table gives medians and the median of the
# per-round ratios.

_RAW_PUB = """
import os, sys, time
from edgeship.common.mqtt import MqttSession, SessionSettings
url, chunk, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pub = MqttSession(SessionSettings(url=url, client_id="bench-raw-pub", clean_start=True,
                                  session_expiry_s=0), lambda m: None)
pub.start()
assert pub.wait_connected(10)
payload = os.urandom(chunk)
print("ready", flush=True)
for line in sys.stdin:
    infos = [pub.publish("bench/raw", payload, qos=1) for _ in range(total // chunk)]
    for info in infos:
        info.wait_for_publish(60)
pub.stop()
"""


def _fleet(broker_url: str, repo: Path, tmp: Path):
    from edgeship.fleet.server import FleetServer, FleetSettings
    fleet = FleetServer(FleetSettings(mqtt_url=broker_url, repo_dir=repo,
                                      db_path=tmp / "fleet.db"))
    fleet.start()
    return fleet


def _fleet_process(broker_url: str, repo: Path, tmp: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "edgeship", "fleet", "serve", "--mqtt",
                             broker_url, "--repo", str(repo), "--db", str(tmp / "fleet.db")],
                            stdout=subprocess.PIPE, text=True)
    if "serving" not in (proc.stdout.readline() or ""):
        proc.kill()
        raise RuntimeError("fleet serve did not start")
    return proc


def _device(broker_url: str, chunk: int, name: str):
    from edgeship.common.mqtt import MqttSession, SessionSettings
    from edgeship.agent.protocol import Topics
    from edgeship.agent.update.transfer import MqttFetcher, TransferClient, TransferSettings
    holder = {}
    session = MqttSession(SessionSettings(url=broker_url, client_id=f"bench-{name}"),
                          on_message=lambda m: holder["c"].on_response(m))
    client = TransferClient(name, session.publish,
                            TransferSettings(chunk_bytes=chunk, request_timeout_s=2.0))
    holder["c"] = client
    session.start([(Topics.transfer_response(name), 1)])
    assert session.wait_subscribed(10)
    return session, client, MqttFetcher(client)


PATH = "targets/bench/1/blob"


def fetch_once(fetcher) -> float:
    t0 = time.perf_counter()
    received = sum(len(block) for block in fetcher.fetch("mqtt://fleet/" + PATH))
    elapsed = time.perf_counter() - t0
    assert received == BLOB_BYTES
    return elapsed


def resume_resent(broker, repo: Path, tmp: Path, chunk: int) -> int:
    """Bytes the fleet server sent beyond the file after a broker restart at 50 %."""
    fleet = _fleet(broker.url, repo, tmp)
    session, _, fetcher = _device(broker.url, chunk, "resume")
    received, restarted = 0, False
    try:
        for block in fetcher.fetch("mqtt://fleet/" + PATH):
            received += len(block)
            if not restarted and received >= BLOB_BYTES // 2:
                broker.restart()  # every client is cut off; sessions persist
                restarted = True
        sent = fleet.stats.snapshot()["bytes_sent"]
    finally:
        session.stop()
        fleet.stop()
    assert received == BLOB_BYTES
    return sent - BLOB_BYTES


class RawPaho:
    """The same bytes published raw by paho (another process) to a subscriber here."""

    def __init__(self, broker, chunk: int) -> None:
        from edgeship.common.mqtt import MqttSession, SessionSettings
        self._done, self._got = threading.Event(), 0
        self.sub = MqttSession(SessionSettings(url=broker.url, client_id="bench-raw-sub",
                                               clean_start=True, session_expiry_s=0),
                               self._on_msg)
        self.sub.start([("bench/raw", 1)])
        assert self.sub.wait_subscribed(10)
        self.pub = subprocess.Popen([sys.executable, "-c", _RAW_PUB, broker.url, str(chunk),
                                     str(BLOB_BYTES)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        assert self.pub.stdout.readline().startswith("ready")

    def _on_msg(self, m) -> None:
        self._got += len(m.payload)
        if self._got >= BLOB_BYTES:
            self._done.set()

    def once(self) -> float:
        self._got = 0
        self._done.clear()
        t0 = time.perf_counter()
        self.pub.stdin.write("go\n")
        self.pub.stdin.flush()
        assert self._done.wait(300)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.pub.stdin.close()
        self.pub.wait(30)
        self.sub.stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(fn, pids: tuple[int, int], reps: int) -> tuple[float, float, float]:
    """Wall seconds and CPU seconds of (receiver, sender) for ``reps`` transfers."""
    cpu0 = [_cpu_s(p) for p in pids]
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    wall = time.perf_counter() - t0
    cpu1 = [_cpu_s(p) for p in pids]
    return wall, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]


def throughput_row(broker, repo: Path, tmp: Path, chunk: int, rounds: int,
                   reps: int = 5) -> dict:
    """``rounds`` alternating rounds; each moves the 20 MB ``reps`` times (one round is
    long enough that scheduler noise on a shared machine does not dominate)."""
    fleet = _fleet_process(broker.url, repo, tmp)
    raw = RawPaho(broker, chunk)
    session, _, fetcher = _device(broker.url, chunk, f"d{chunk}")
    raw_rounds, fetch_rounds = [], []
    try:
        raw.once(), fetch_once(fetcher)  # warm-up: connections, page cache, imports
        for _ in range(rounds):
            raw_rounds.append(_timed(raw.once, (os.getpid(), raw.pub.pid), reps))
            fetch_rounds.append(_timed(lambda: fetch_once(fetcher), (os.getpid(), fleet.pid),
                                       reps))
    finally:
        session.stop()
        raw.close()
        fleet.terminate()
        fleet.wait(30)
    raw_s = [r[0] / reps for r in raw_rounds]
    fetch_s = [f[0] / reps for f in fetch_rounds]
    ratios = [r / f for r, f in zip(raw_s, fetch_s)]
    total = rounds * reps
    return {"chunk_KiB": chunk // 1024, "rounds": rounds, "reps": reps,
            "fetch_MB_s": BLOB_BYTES / statistics.median(fetch_s) / 1e6,
            "raw_paho_MB_s": BLOB_BYTES / statistics.median(raw_s) / 1e6,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "best_fetch_MB_s": BLOB_BYTES / min(fetch_s) / 1e6,
            "best_raw_MB_s": BLOB_BYTES / min(raw_s) / 1e6,
            "best_ratio": min(raw_s) / min(fetch_s),
            # CPU seconds per 20 MB: the device vs the raw subscriber, the fleet server vs
            # the raw publisher (the broker is the same C process in both)
            "device_cpu_s": sum(f[1] for f in fetch_rounds) / total,
            "subscriber_cpu_s": sum(r[1] for r in raw_rounds) / total,
            "fleet_cpu_s": sum(f[2] for f in fetch_rounds) / total,
            "publisher_cpu_s": sum(r[2] for r in raw_rounds) / total}


def transport_rows(tmp: Path, rounds: int = 5) -> list[dict]:
    from edgeship.fleet.broker import Mosquitto
    repo = tmp / "repo"
    (repo / "targets" / "bench" / "1").mkdir(parents=True)
    (repo / "metadata").mkdir()
    (repo / PATH).write_bytes(os.urandom(BLOB_BYTES))
    rows = []
    broker = Mosquitto().start()
    try:
        for chunk in (256 * 1024, 512 * 1024, 1024 * 1024):  # 512 KiB: the default
            rows.append(throughput_row(broker, repo, tmp, chunk, rounds))
        chunk = 512 * 1024
        resent = resume_resent(broker, repo, tmp, chunk)
        rows.append({"resume_chunk_KiB": chunk // 1024, "bytes_resent": resent,
                     "chunks_resent": resent / chunk})
    finally:
        broker.cleanup()
    return rows


# --- 3: deltas ------------------------------------------------------------------------------

_APPLY = """
import sys, time
from pathlib import Path
from edgeship.agent.delta import apply_delta


def status_kb(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])


with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset this process's peak RSS (VmHWM) to its current RSS
base_kb = status_kb('VmRSS')
t0 = time.perf_counter()
apply_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), max_bytes=1 << 31)
dt = time.perf_counter() - t0
print(dt, status_kb('VmHWM') - base_kb, status_kb('VmHWM'))
"""


def delta_row(name: str, old: Path, new: Path, tmp: Path) -> dict:
    from edgeship.agent.delta import read_header
    from edgeship.fleet.delta import make_delta, onnx_delta
    t0 = time.perf_counter()
    delta = make_delta(old, new)
    make_s = time.perf_counter() - t0
    onnx_only = len(onnx_delta(old.read_bytes(), new.read_bytes()))
    d = tmp / f"{name}.delta"
    d.write_bytes(delta)
    out = tmp / f"{name}.rebuilt"
    res = subprocess.run([sys.executable, "-c", _APPLY, str(d), str(old), str(out)],
                         capture_output=True, text=True, check=True)
    apply_s, peak_kb, process_kb = res.stdout.split()
    assert out.read_bytes() == new.read_bytes()
    with open(d, "rb") as f:
        method = read_header(f).method
    return {"model": name, "full_bytes": new.stat().st_size, "delta_bytes": len(delta),
            "pct_of_full": 100 * len(delta) / new.stat().st_size, "method": method,
            "onnx_tensors_bytes": onnx_only, "make_s": make_s, "apply_s": float(apply_s),
            # peak RSS of a fresh child process during apply_delta minus its RSS just
            # before (after importing agent.delta), from /proc/self/status VmHWM, whose peak
            # is reset first through /proc/self/clear_refs; and the child's whole peak
            "apply_peak_MB": int(peak_kb) / 1024,
            "apply_process_peak_MB": int(process_kb) / 1024}


def digits_pair(tmp: Path) -> tuple[Path, Path]:
    import torch
    from edgeship.converter.digits import train_digits
    from edgeship.converter.export import export_onnx
    trained = train_digits(epochs=3)
    x = trained.data.x_test[:1]
    old = export_onnx(trained.model, x, tmp / "digits-v1.onnx")
    model = trained.model
    for p in model.parameters():
        p.requires_grad = False
    head = model.classifier[-1]
    for p in head.parameters():
        p.requires_grad = True
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    xs = torch.from_numpy(trained.data.x_train)
    ys = torch.from_numpy(trained.data.y_train)
    model.train()
    for _ in range(2):  # retrain only the last layer
        for i in range(0, len(xs), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[i:i + 64]), ys[i:i + 64]).backward()
            opt.step()
    model.eval()
    new = export_onnx(model, x, tmp / "digits-v2.onnx")
    return old, new


def minilm_pair(tmp: Path) -> tuple[Path, Path]:
    import torch
    from bench.converter import _minilm_torch

    encoder, tok = _minilm_torch()

    class Classifier(torch.nn.Module):
        def __init__(self, head) -> None:
            super().__init__()
            self.encoder, self.head = encoder, head

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state
            return self.head(h[:, 0])

    enc = tok(["hello world"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    paths = []
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 4)
    for version in (1, 2):
        if version == 2:  # retrain the head a few steps on random targets
            opt = torch.optim.SGD(head.parameters(), lr=0.1)
            feats = torch.randn(64, 384)
            for _ in range(20):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(head(feats),
                                                  torch.randint(0, 4, (64,))).backward()
                opt.step()
        out = tmp / f"minilm-v{version}.onnx"
        with torch.no_grad():
            torch.onnx.export(Classifier(head).eval(), tuple(enc[n] for n in names), str(out),
                              dynamo=False, input_names=names, output_names=["logits"],
                              dynamic_axes={n: {0: "b", 1: "s"} for n in names},
                              opset_version=17)
        paths.append(out)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench-ota")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-deltas", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="throughput rounds per chunk size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-ota-") as t:
        tmp = Path(t)
        print(f"load before: {_load()}", flush=True)
        rows = transport_rows(tmp, args.rounds)
        deltas = [] if args.skip_deltas else \
            [delta_row("digits-cnn (last layer retrained)", *digits_pair(tmp), tmp)]
        if not (args.skip_minilm or args.skip_deltas):
            try:
                deltas.append(delta_row("all-MiniLM-L6-v2 (head retrained)",
                                        *minilm_pair(tmp), tmp))
            except Exception as e:  # noqa: BLE001 - report, do not hide, a failed export
                print(f"MiniLM skipped: {type(e).__name__}: {e}")
        print(f"load after: {_load()}")
    if args.json:
        print(json.dumps({"transport": rows, "deltas": deltas}))
        return 0
    print("\nMQTT transfer of 20 MB on loopback: `fleet serve` process -> TUF fetcher here, vs "
          "the same bytes published raw by paho (another process) at QoS 1 to a subscriber "
          "here (alternating rounds of 5 x 20 MB each)")
    print(f"{'':>15} {'--- median of rounds ---':>31} {'(min-max)':>11}   "
          f"{'---- best of rounds ----':>30}")
    print(f"{'chunk':>8} {'rounds':>6} {'fetch MB/s':>11} {'raw MB/s':>9} {'fetch/raw':>9} "
          f"{'':>11}   {'fetch MB/s':>11} {'raw MB/s':>9} {'fetch/raw':>9}")
    for r in rows:
        if "ratio" in r:
            print(f"{r['chunk_KiB']:>5}KiB {r['rounds']:>6} {r['fetch_MB_s']:>11.1f} "
                  f"{r['raw_paho_MB_s']:>9.1f} {r['ratio']:>8.0%} "
                  f"{r['ratio_min']:>5.0%}-{r['ratio_max']:<4.0%}   "
                  f"{r['best_fetch_MB_s']:>11.1f} {r['best_raw_MB_s']:>9.1f} "
                  f"{r['best_ratio']:>8.0%}")
    print("CPU seconds per 20 MB: device (fetcher) vs raw subscriber, fleet server vs raw "
          "publisher")
    for r in rows:
        if "ratio" in r:
            print(f"{r['chunk_KiB']:>5}KiB  device {r['device_cpu_s']:.3f} s vs subscriber "
                  f"{r['subscriber_cpu_s']:.3f} s; fleet {r['fleet_cpu_s']:.3f} s vs "
                  f"publisher {r['publisher_cpu_s']:.3f} s")
    r = rows[-1]
    print(f"\nforced disconnect (broker restart) at 50%: {r['bytes_resent']} bytes re-sent "
          f"= {r['chunks_resent']:.2f} chunks of {r['resume_chunk_KiB']} KiB")
    print("\nDeltas (apply = fresh process, like the device; +peak MB = peak RSS during the "
          "apply minus RSS before it, VmHWM reset via /proc/self/clear_refs)")
    print(f"{'model':<36} {'full':>11} {'delta':>10} {'%':>6} {'method':>13} "
          f"{'tensors-only':>12} {'apply s':>8} {'+peak MB':>9} {'process MB':>10}")
    for d in deltas:
        print(f"{d['model']:<36} {d['full_bytes']:>11} {d['delta_bytes']:>10} "
              f"{d['pct_of_full']:>5.2f}% {d['method']:>13} {d['onnx_tensors_bytes']:>12} "
              f"{d['apply_s']:>8.3f} {d['apply_peak_MB']:>9.1f} "
              f"{d['apply_process_peak_MB']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
