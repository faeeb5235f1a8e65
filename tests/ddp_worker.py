"""Run by ``torchrun --nproc-per-node 2`` from tests/test_distributed.py (not collected by pytest).

Each rank: (1) reads its share of the label dataset for one pass and records the rows'
token hashes; (2) trains the student config under DDP; (3) records a checksum of its
parameters. Everything goes to OUT/rank<r>.json.

    torchrun --nproc-per-node 2 tests/ddp_worker.py CONFIG OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from labelgen.contract.configs import ConfigError
from students.config import load_train_config
from students.stream import LabelStream, open_dataset
from students.trainer import Trainer


def main(config: str, out: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        cfg = load_train_config(config)
    except ConfigError as exc:
        sys.exit(str(exc))
    url = cfg.data.url
    assert url is not None
    manifest, _, _ = open_dataset(url)
    stream = LabelStream(url, manifest, None, 3, seed=7, loop=False, rank=rank, world_size=world)
    hashes = [int(h) for batch in stream for h in batch["token_hash"]]
    trainer = Trainer(cfg, log=lambda msg: print(f"[rank {rank}] {msg}", flush=True))
    trainer.setup()
    trainer.train()
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in trainer.model.parameters()))
    record = {"rank": rank, "world": world, "hashes": hashes, "checksum": checksum, "step": trainer.step}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
