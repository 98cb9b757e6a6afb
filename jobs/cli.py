"""`fc7`: one console script, one subcommand per job. Each subcommand is a script in `jobs/`.

Subcommand modules expose `main(argv) -> int`; they are imported only when called, so
`fc7 --help` is instant and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import importlib
import sys

from jobs import run
from pipeline import __version__

COMMANDS = {
    "extract": ("jobs.extract", "embed images (folder, manifest, s3://, gs://) into Parquet"),
    "index": ("jobs.build_index", "build or extend a FAISS similarity index from embeddings"),
    "query": ("jobs.query", "find the images most similar to images, ids or vectors"),
    "train": ("jobs.train_classifier", "train and evaluate a classifier on labelled embeddings"),
    "predict": ("jobs.predict", "label embeddings or images with a classifier or fine-tune"),
    "finetune": ("jobs.finetune", "fine-tune the network on labelled images (Ray Train, DDP)"),
    "serve": ("jobs.serve", "serve an index over HTTP with a search web page"),
    "duplicates": ("jobs.duplicates", "group exact and near-duplicate images, pick one to keep"),
    "audit": ("jobs.audit", "find label errors, outliers and train/test leaks (cleanlab)"),
    "map": ("jobs.map", "lay the collection out in 2-D (UMAP or PCA) for the web page"),
}

USAGE = f"""usage: fc7 COMMAND [options]   (fc7 COMMAND --help for its options)

AlexNet FC7 (or --model) image embeddings on Ray, similarity search, classifiers and
fine-tuning. Version {__version__}.

commands:
""" + "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()) + """

example:
  fc7 extract examples/images --out out/embeddings --weights random
  fc7 index out/embeddings --out out/index
  fc7 query out/index --image examples/images/dalmatian/image_0001.jpg -k 5
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"fc7 {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fc7: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return run(command, module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
