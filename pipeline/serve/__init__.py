"""`fc7 serve`: a built similarity index over HTTP, with a search web page.

One index is opened at start-up and shared read-only by all requests; the embedding model is
loaded on the first image query only, so a server answering id queries never pays for it.
With `--map`, `--duplicates` and `--audit` the page also shows the folders that `fc7 map`,
`fc7 duplicates` and `fc7 audit` wrote (Map, Duplicates and Issues views), read and checked
once at start-up.

    config     ServeConfig, the options of `fc7 serve`
    security   trusted hosts, same-origin POST, security headers and CSP, upload size and deadline
    images     uploads decoded for the model, thumbnails of indexed files, their HTTP errors
    service    what the endpoints share: index, classifier, lazy model, decode budget, thumbnails
    curation   the curation folders, checked against the index, and the answers of /map,
               /duplicates and /issues
    app        create_app: the routes and the shape of their answers
    server     uvicorn's settings, a deadline on request heads, run_server, background_server

The page itself is `pipeline/static/` (package data): `app.js` (views, Search), `map.js` (Map),
`curation.js` (Duplicates, Issues). The command line is `jobs/serve.py`.

Safety: an id from a request is only ever a key into the index's id map, never part of a file
path, so `/thumbnails/../../etc/passwd` is an unknown id (404) and the only files this server
reads are the images the index names. Only requests naming an allowed host are answered (DNS
rebinding), and a browser's unsafe request from another origin is refused (403). Uploads are
refused above `max_upload` bytes (413) before they are parsed, and from the image header
(`pipeline.decode.read_header`), before decoding: formats outside
`pipeline.decode.ALLOWED_FORMATS` (415), more than `max_pixels` (413). Every decode, of an upload
or a thumbnail, holds its estimated memory in one `DecodeBudget`, so concurrent huge images wait
for each other or are refused (413) rather than exhaust memory. A request's head and body must
arrive within `request_timeout` seconds.

Example:
    $ fc7 serve out/index --classifier out/classifier --port 8000
    $ curl -F image=@cat.jpg 'http://127.0.0.1:8000/search?k=5'
    $ curl 'http://127.0.0.1:8000/search?id=cats/cat1.jpg&k=5'
    $ fc7 serve out/index --map out/map --duplicates out/duplicates --audit out/audit
    $ curl 'http://127.0.0.1:8000/issues?kind=label&limit=10'

    >>> from pipeline.serve import background_server, create_app
    >>> with background_server(create_app("out/index")) as url:  # doctest: +SKIP
    ...     httpx.get(url + "/health").json()
"""

from pipeline.serve.app import MAX_K, create_app
from pipeline.serve.config import ServeConfig
from pipeline.serve.images import DECODE_STATUS, make_thumbnail, read_indexed_file
from pipeline.serve.security import check_host_patterns, default_allowed_hosts
from pipeline.serve.server import background_server, run_server, uvicorn_config

__all__ = [
    "DECODE_STATUS",
    "MAX_K",
    "ServeConfig",
    "background_server",
    "check_host_patterns",
    "create_app",
    "default_allowed_hosts",
    "make_thumbnail",
    "read_indexed_file",
    "run_server",
    "uvicorn_config",
]
