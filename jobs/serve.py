"""`fc7 serve INDEX_DIR [options]`: serve an index over HTTP, with a search page, until
interrupted. Also runs as `python jobs/serve.py INDEX_DIR [options]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `python jobs/serve.py`

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.serve import ServeConfig, create_app, default_allowed_hosts, run_server  # noqa: E402

DESCRIPTION = """Serve an index built by `fc7 index` over HTTP, with a search page at /
and the API documented at /docs."""
EPILOG = """example:
  fc7 serve out/index --classifier out/classifier --port 8000
  fc7 serve out/index --map out/map --duplicates out/duplicates --audit out/audit
  then open http://127.0.0.1:8000/"""


def main(argv: list[str] | None = None) -> int:
    """Open the index (and classifier), then serve them until interrupted.

    Raises:
        ConfigError: an invalid option.
        ArtifactError, ProvenanceMismatch: the index, classifier or a curation folder cannot be
            used.
    """
    config = parse_config(ServeConfig, argv, "fc7 serve", DESCRIPTION, EPILOG)
    allowed_hosts = config.host_patterns or default_allowed_hosts(config.host)
    app = create_app(
        config.index_dir,
        config.classifier,
        config.max_upload,
        config.max_pixels,
        config.thumbnail_size,
        config.device,
        allowed_hosts=allowed_hosts,
        decode_memory=config.decode_memory,
        request_timeout=config.request_timeout,
        mmap=config.mmap,
        map_dir=config.map,
        duplicates_dir=config.duplicates,
        audit_dir=config.audit,
    )
    index = app.state.service.index
    mapped = " (memory-mapped, searched on the CPU)" if index.mmap else ""
    views = [name for name, shown in app.state.curation.views().items() if shown]
    print(
        f"fc7 serve: {len(index):,} items from {config.index_dir}{mapped}; "
        f"views: {', '.join(['search', *views])}; open "
        f"http://{config.host}:{config.port}/ (API docs at /docs)",
        file=sys.stderr,
    )
    for note in app.state.curation.notes():
        print(f"fc7 serve: {note}", file=sys.stderr)
    if allowed_hosts == ["*"] and config.allowed_hosts is None:
        print(
            f"fc7 serve: --host {config.host} answers requests naming any host; pass "
            "--allowed-hosts with this server's names so that other sites cannot reach it "
            "through DNS rebinding",
            file=sys.stderr,
        )
    run_server(app, config)
    return 0


if __name__ == "__main__":
    sys.exit(run("serve", main, None))
