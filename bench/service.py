"""Dataset service benchmark: reading through ``labelgen://`` vs the storage URL, and catalog latency.

Builds a synthetic label dataset (bench/loader.py's builder, plus its commit records so
it can be published), starts ``labelgen serve`` and moto's S3 server as separate
processes on 127.0.0.1, publishes the dataset from a local path and from S3, and
measures in one run, interleaved rounds, best of each:

    local             LabelStream over the local path (verify='error': read whole + sha256)
    service stream    LabelStream over labelgen://…@1 of the local dataset: the
                      service's signed byte-range route (target >= 0.5x local)
    s3 direct         LabelStream over the s3:// URL (s3fs, the reader holds credentials)
    s3 presigned      LabelStream over labelgen://…@1 of the S3 dataset: presigned URLs,
                      bytes straight from S3 (target >= 0.9x s3 direct)

then 8 client processes resolving a version and listing its files (``GET …/versions/1``
and ``GET …/versions/1/files``) in a loop, and prints p50 / p99 latency (target p99 <=
50 ms on loopback). Tiny CPU run::

    python bench/service.py --sequences 200 --seq-len 512 --k 32
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import fsspec
import numpy as np

from labelgen.contract.commits import CommitLog, JobRecord
from labelgen.contract.format import Manifest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loader import build_dataset, ours, timed  # noqa: E402  (the loader benchmark's builder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP answer: the server is up
                return
            time.sleep(0.2)
    raise SystemExit(f"{what} did not start")


def publishable(root: str, sequences: int, seq_len: int, k: int) -> Manifest:
    """The synthetic dataset with the commit records a labeling job would have written."""
    manifest = build_dataset(root, sequences, seq_len, k)
    log = CommitLog(fsspec.filesystem("file"), root)
    log.write_job(JobRecord(k=manifest.k, codec=manifest.codec, products=dict(manifest.products)))
    for shard in manifest.shards:
        log.write_shard(shard)
    return manifest


def client_loop(args: tuple[str, str, int]) -> list[float]:
    """One client process: ``calls`` × (resolve, list files); each call's latency in s."""
    address, token, calls = args
    from labelgen.catalog.client import CatalogClient

    client = CatalogClient(address, token=token)
    out = []
    for i in range(calls):
        start = time.perf_counter()
        if i % 2:
            client.files("bench/local@1")
        else:
            client.version("bench/local@latest")
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="catalog calls per client")
    parser.add_argument(
        "--workers", type=int, default=2, help="`labelgen serve --workers` (one per core here)"
    )
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="labelgen-bench-service-")
    local = os.path.join(work, "labels")
    manifest = publishable(local, args.sequences, args.seq_len, args.k)
    size = sum(s.bytes for s in manifest.shards)
    print(
        f"dataset: {args.sequences} x {args.seq_len} tokens, top-{args.k}, {size / 2**20:.1f} MiB in {work}"
    )

    s3_port, port = free_port(), free_port()
    aws = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
    }
    os.environ.update(aws)
    token = "lgt_" + secrets.token_urlsafe(32)
    procs = []
    try:
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(moto)
        wait_for(f"http://127.0.0.1:{s3_port}/", moto, "moto server")
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "labelgen.cli",
                "serve",
                "--data-dir",
                os.path.join(work, "service"),
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],
            env={**os.environ, "LABELGEN_BOOTSTRAP_TOKEN": token},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(serve)
        address = f"127.0.0.1:{port}"
        wait_for(f"http://{address}/health", serve, "labelgen serve")

        s3 = fsspec.filesystem("s3")
        s3.mkdir("bench-labels")
        s3.put(f"{local}/", "bench-labels/web", recursive=True)
        s3.invalidate_cache()
        from labelgen.catalog.client import CatalogClient

        client = CatalogClient(address, token=token)
        client.create_team("bench")
        client.publish("bench/local", local)
        client.publish("bench/s3", "s3://bench-labels/web")
        os.environ["LABELGEN_TOKEN"] = token

        def reader(url: str):
            def go() -> int:
                fsspec.filesystem("labelgen").clear_instance_cache()
                return ours(url, manifest, args.batch)

            return go

        readers = {
            "local": reader(local),
            "service stream": reader(f"labelgen://{address}/bench/local@1"),
            "s3 direct": reader("s3://bench-labels/web"),
            "s3 presigned": reader(f"labelgen://{address}/bench/s3@1"),
        }
        # Each reader's first round is a warm-up (imports, connections): not counted.
        best = timed(readers, {name: args.repeats + 1 for name in readers})
        for name, rate in best.items():
            print(f"{name:<16} {rate:>12,.0f} label positions/s")
        print(
            f"service stream / local     {best['service stream'] / best['local']:.2f}x (target >= 0.5x)\n"
            f"s3 presigned / s3 direct   {best['s3 presigned'] / best['s3 direct']:.2f}x (target >= 0.9x)"
        )

        with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
            pool.map(client_loop, [(address, token, 10)] * args.clients)  # warm-up
            latencies = np.concatenate(pool.map(client_loop, [(address, token, args.calls)] * args.clients))
        p50, p99 = np.percentile(latencies * 1000, [50, 99])
        print(
            f"catalog calls, {args.clients} concurrent clients x {args.calls}, {args.workers} server "
            f"worker(s): p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms (target p99 <= 50 ms)"
        )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
