"""Distributed training with torchrun: 2 CPU processes (gloo), DistributedDataParallel.

Each rank reads different row groups and together they make exactly one pass; ranks
end with identical weights; two launches give identical results (deterministic), the
second reading the same labels through the dataset service (``labelgen://``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_trainer import config as student_config
from test_trainer import config_dict

from labelgen.contract.dataset import read_manifest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent


def launch(config: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port
        "--nproc-per-node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(config),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_split_the_data_and_train_in_lockstep(fake_labels, teacher_dir, tmp_path, monkeypatch):
    import pyarrow.dataset as ds

    from labelgen.catalog.client import CatalogClient
    from labelgen.service.app import ServiceSettings
    from labelgen.service.server import ServiceThread

    token = "lgt_" + "d" * 43
    monkeypatch.setenv("LABELGEN_TOKEN", token)  # the ranks inherit it
    service = ServiceThread(
        ServiceSettings(db_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}", bootstrap_token=token)
    )

    def config(name: str, url: str) -> Path:
        cfg = config_dict(
            student_config(
                url,
                teacher_dir,
                tmp_path / name / "run",
                data={"batch_sequences": 3, "holdout_row_groups": 1},
                loss={"kind": "forward_kl", "chunk_tokens": 64},
                optim={"max_steps": 4},
                train={"eval_batches": 2},
            )
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    first = launch(config("a", fake_labels), tmp_path / "a-out")
    with service:
        client = CatalogClient(service.address, token=token)
        client.create_team("nlp")
        client.publish("nlp/web", fake_labels)
        second = launch(config("b", f"labelgen://{service.address}/nlp/web@1"), tmp_path / "b-out")
        runs = client.version("nlp/web@1")["runs"]
    assert [r["name"] for r in runs] == [str((tmp_path / "b" / "run").resolve())]  # rank 0 reports once

    # Data: different rows per rank, together one pass over every row.
    m = read_manifest(fake_labels)
    every = ds.dataset([f"{fake_labels}/{s.path}" for s in m.shards]).to_table(columns=["token_hash"])
    # The reader hands token_hash (uint64) out reinterpreted as int64.
    expected = sorted(every.column("token_hash").to_numpy().view(np.int64).tolist())
    ranks = [set(r["hashes"]) for r in first]
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]
    assert sorted(first[0]["hashes"] + first[1]["hashes"]) == expected

    # Training: lockstep weights across ranks, and the same result from a second launch.
    assert first[0]["step"] == first[1]["step"] == 4
    assert first[0]["checksum"] == first[1]["checksum"]
    assert first[0]["checksum"] == second[0]["checksum"]
    assert first[0]["hashes"] == second[0]["hashes"]
    assert (tmp_path / "a" / "run" / "final" / "config.json").is_file()
