"""Run by tests/training/test_train_data.py under `torchrun --nproc_per_node 2` (gloo): which
windows of a prepared folder each rank draws, gathered on rank 0 and written as JSON.

    torchrun --standalone --nproc_per_node 2 tests/training/ddp_windows.py DATA_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from corpus.batches import EpochBatches  # noqa: E402
from corpus.shards import open_split  # noqa: E402

SEQ_LEN, BATCH, ACCUM, SEED, EPOCHS = 16, 2, 3, 5, 2


def main() -> None:
    data, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = open_split(data, "train")
    b = EpochBatches(tokens, SEQ_LEN, BATCH, ACCUM, world, rank, SEED)
    mine = {"rank": rank, "steps_per_epoch": b.steps_per_epoch, "num_windows": b.num_windows,
            "epochs": []}
    for epoch in range(EPOCHS):
        steps = []
        for step in range(b.steps_per_epoch):
            micro = []
            for m in range(ACCUM):
                starts = b.window_starts(epoch, step, m)
                x, y = b.get(epoch, step, m)
                # The rows are the tokens at those starts (read across shard boundaries).
                ok = all(x[i].tolist() == tokens[s:s + SEQ_LEN].tolist() and
                         y[i].tolist() == tokens[s + 1:s + SEQ_LEN + 1].tolist()
                         for i, s in enumerate(starts.tolist()))
                micro.append({"starts": starts.tolist(), "rows_match": ok})
            steps.append(micro)
        mine["epochs"].append(steps)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        out.write_text(json.dumps({"world_size": world, "num_shards": tokens.num_shards,
                                   "shard_ends": tokens.offsets[1:].tolist(),
                                   "ranks": gathered}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
