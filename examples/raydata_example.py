"""fc7 in a Ray Data pipeline of your own: read files, map_batches(FC7Embedder), write Parquet.

    python examples/raydata_example.py                    # the bundled photos, random:0 weights
    python examples/raydata_example.py photos/ --out emb/ --weights imagenet

random:0 weights need no download, but their embeddings are not meaningful.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import pyarrow.dataset as pads
import ray

from pipeline.extract import start_ray, stop_ray
from pipeline.provenance import PARQUET_METADATA_KEY, Provenance
from pipeline.raydata import FC7Embedder
from pipeline.sources import IMAGE_EXTENSIONS

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="?", default=str(HERE / "images"),
                        help="folder of images, read recursively (default: examples/images)")
    parser.add_argument("--out", help="folder for the Parquet files (default: a new "
                        "temporary folder)")
    parser.add_argument("--weights", default="random:0",
                        help="imagenet, random:SEED or a .pth file (default: random:0)")
    parser.add_argument("--rows", type=int, default=3, help="rows to print (default: 3)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="fc7-raydata-")
    options = FC7Embedder.validate_options(weights=args.weights)  # before Ray starts

    started = start_ray()  # joins RAY_ADDRESS if set, else starts a local Ray
    try:
        ds = ray.data.read_binary_files(
            args.images, include_paths=True, file_extensions=sorted(IMAGE_EXTENSIONS)
        )
        ds = ds.map_batches(
            FC7Embedder,
            fn_constructor_kwargs=options,
            compute=ray.data.ActorPoolStrategy(size=1),  # model replicas
            batch_size=64,
            batch_format="pyarrow",  # the least conversion; the output is Arrow either way
            udf_modifying_row_count=False,
        )
        ds.write_parquet(out)
    finally:
        if started:
            stop_ray()

    # The output is plain Parquet: anything reads it (here pyarrow, in this process).
    written = pads.dataset(out, format="parquet")
    failed = written.count_rows(filter=pads.field("error").is_valid())
    provenance = Provenance.from_json(written.schema.metadata[PARQUET_METADATA_KEY], out)
    embedding = written.schema.field("embedding").type
    print(f"{out}: {written.count_rows()} images, {failed} failed; {provenance.layer} of "
          f"AlexNet, weights {provenance.weights}; embedding {embedding}")
    for row in written.head(args.rows).to_pylist():
        values = ", ".join(f"{value:.4f}" for value in (row["embedding"] or [])[:4])
        print(f"  {row['path']}: {row['error'] or values + ', ...'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
