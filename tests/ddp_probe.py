"""training.py's main with one more callback, for tests/test_ddp.py: every rank appends the prompts of each
batch it trains on to DDP_PROBE_RECORD-rank{R}.jsonl. Run as a program (Lightning's DDP launcher starts
the other ranks by running the same command again)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L  # noqa: E402

import training  # noqa: E402

RECORD_VARIABLE = "DDP_PROBE_RECORD"


class BatchRecord(L.Callback):
    """One JSON line per training batch: rank, global step, epoch, prompts, and whether it came from the cache."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        path = Path(f"{os.environ[RECORD_VARIABLE]}-rank{trainer.global_rank}.jsonl")
        line = {"rank": trainer.global_rank, "world_size": trainer.world_size, "step": trainer.global_step,
                "epoch": trainer.current_epoch, "prompts": list(batch["txt"]), "cached": "posterior" in batch}
        with open(path, "a") as record:
            record.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(training.main(callbacks=[BatchRecord()]))
