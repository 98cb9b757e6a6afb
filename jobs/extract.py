"""Ray job: embed an image collection into Parquet.

    fc7 extract SOURCE --out DIR [options]
    ray job submit --working-dir . -- python jobs/extract.py SOURCE --out DIR [options]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

from tqdm import tqdm  # noqa: E402

from pipeline.cli import run  # noqa: E402
from pipeline.config import add_option, load_config, new_parser  # noqa: E402
from pipeline.extract import (  # noqa: E402
    ExtractConfig,
    ShardStats,
    pending_shards,
    prepare_output,
    run_shards,
    summary,
    write_plan,
)
from pipeline.model import load_weights, make_provenance  # noqa: E402
from pipeline.sources import iter_inputs  # noqa: E402

EPILOG = """examples:
  fc7 extract photos/ --out embeddings/                   ImageNet weights, fc7, all cores/GPUs
  fc7 extract list.csv --out emb/ --layer fc6 --dtype float16
  fc7 extract s3://bucket/images --out s3://bucket/embeddings --num-workers 8
  fc7 extract photos/ --out emb/ --weights random --limit 100    smoke test, no download
Run the same command again to resume an interrupted run."""


def parse(argv):
    parser = new_parser("fc7 extract", "Embed images with AlexNet into Parquet.", EPILOG)
    parser.add_argument("source", nargs="?", help="folder of images, or a .txt/.csv/.parquet "
                        "manifest (local path or s3://, gs:// URI)")
    add_option(parser, "--out", ExtractConfig, "output folder or URI for the Parquet dataset")
    add_option(parser, "--weights", ExtractConfig, "'imagenet' (torch hub cache, downloaded if "
               "missing), 'random' or 'random:SEED' (a seeded smoke test), or a .pth state dict")
    add_option(parser, "--layer", ExtractConfig, "layer to output: fc7, fc6 (4096-d) or pool5 "
               "(9216-d)", choices=["fc7", "fc6", "pool5"])
    add_option(parser, "--batch-size", ExtractConfig, "images per model call", type=int)
    add_option(parser, "--device", ExtractConfig, "auto (CUDA if any), cpu or cuda",
               choices=["auto", "cpu", "cuda"])
    add_option(parser, "--dtype", ExtractConfig, "stored vector type",
               choices=["float32", "float16"])
    add_option(parser, "--limit", ExtractConfig, "embed only the first N images", type=int)
    add_option(parser, "--num-workers", ExtractConfig, "model replicas (Ray actors); none "
               "means one per GPU, or one per 8 CPUs", type=int)
    add_option(parser, "--cpus-per-worker", ExtractConfig, "CPUs (threads) per replica; none "
               "means all CPUs per GPU, or up to 8", type=int)
    add_option(parser, "--shard-size", ExtractConfig, "images per output part file", type=int)
    add_option(parser, "--max-pixels", ExtractConfig, "refuse images larger than this "
               "(width x height, read from the header before decoding)", type=int)
    add_option(parser, "--max-bytes", ExtractConfig, "refuse files larger than this, e.g. "
               "512MiB (only regular files are read: never devices or FIFOs)", metavar="SIZE")
    add_option(parser, "--decode-memory", ExtractConfig, "memory the decodes of one worker may "
               "hold at once, e.g. 2GiB; an image that needs more is an error row",
               metavar="SIZE")
    add_option(parser, "--overwrite", ExtractConfig, "replace an fc7 output made with other "
               "settings; deletes only the files fc7 wrote there", action="store_true")
    return load_config(ExtractConfig, parser.parse_args(argv))


def main(argv=None) -> int:
    config = parse(argv)
    provenance = make_provenance(load_weights(config.weights), config.layer, config.dtype)
    plan = prepare_output(config, provenance) or write_plan(
        config, provenance, iter_inputs(config.source)
    )
    shards = pending_shards(plan)
    if not shards:
        print(f"fc7 extract: {config.out} is already complete ({plan.inputs:,} images); "
              "nothing to do")
        return 0
    started = time.perf_counter()
    done = plan.inputs - sum(plan.shard_rows(shard) for shard in shards)
    with tqdm(total=plan.inputs, initial=done, unit="img", desc="embedding") as bar:
        def progress(shard: ShardStats, so_far: ShardStats) -> None:
            bar.update(shard.seen)
            bar.set_postfix(failed=so_far.failed)

        total = run_shards(config, plan, shards, progress)
    print(summary(total, plan, time.perf_counter() - started, plan.shards - len(shards)))
    return 0


if __name__ == "__main__":
    sys.exit(run("extract", main, None))
