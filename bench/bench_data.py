"""Data pipeline throughput: samples per second per worker from webdataset shards (ldm.data.webdataset).

Writes captioned-shapes shards (PNG + caption) to a temporary folder, then reads them through
``WebDatasetDataModule.train_dataloader()`` in the main process (num_workers=0: exactly one worker's work:
tar reading, image decoding, resize/crop, to tensor, shuffling, collation):

    python bench/bench_data.py --num 512 --source-size 512 --sizes 256 512
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

import common

logger = logging.getLogger("bench.data")


def throughput(shards: list[str], size: int, batch_size: int) -> tuple[float, int]:
    """Samples per second of one pass over the shards (the first batch, which opens the files, is not timed)."""
    from ldm.data.webdataset import WebDatasetDataModule

    dm = WebDatasetDataModule(shards, batch_size=batch_size, num_workers=0, size=size, rank=0, world_size=1,
                              shuffle_buffer=100)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    first = next(batches)
    assert first["image"].shape[-1] == size and len(first["caption"]) == batch_size
    count, start = 0, time.perf_counter()
    for batch in batches:
        count += len(batch["caption"])
    elapsed = time.perf_counter() - start
    if count == 0:
        raise SystemExit("only one batch was read: raise --num or lower --batch-size")
    return count / elapsed, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=512, help="samples to write")
    parser.add_argument("--source-size", type=int, default=512, help="side of the stored images")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512], help="training resolutions to read at")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(common.RESULTS / "data.md"))
    args = parser.parse_args()
    threads = common.setup(args.threads)
    from ldm.data.shapes import write_shards

    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-bench-shards-") as tmp:
        shards = write_shards(tmp, args.num, shard_size=max(1, args.num // 4), size=args.source_size)
        for size in args.sizes:
            rate, count = throughput(shards, size, args.batch_size)
            rows.append([f"{args.source_size} px PNG -> {size} px", args.batch_size, count, f"{rate:.0f}"])
            logger.info("%s", rows[-1])
    headers = ["samples", "batch", "samples timed", "samples/s per worker"]
    notes = [f"{args.num} captioned-shapes samples in {len(shards)} tar shards (PNG + txt + json), read once, "
             "shuffle buffer 100, num_workers=0 (the main process is the one worker)",
             "the synthetic shapes compress to small PNGs that decode fast; photographs (JPEG) decode slower, "
             "so read these numbers as the pipeline's own overhead plus a light decode",
             "compare with the training step times in unet*.md: a step on batch 2 takes seconds on this CPU"]
    common.write_report(args.out, "Data pipeline: webdataset shards", common.machine_info(threads, "fp32"),
                        common.markdown_table(headers, rows), notes)


if __name__ == "__main__":
    main()
