"""`make run`: make sure there is an API token, print how to call the service, then become gunicorn.

Without API_TOKEN or API_TOKEN_FILE, a token is generated once into `.api_token` at the repository
root (mode 0600, ignored by git) and reused on later runs; the service reads it through
API_TOKEN_FILE. The process then execs gunicorn with service/gunicorn.conf.py, so signals (Ctrl-C,
SIGTERM, SIGHUP to reload) go straight to the gunicorn master.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import stat
import sys
from pathlib import Path

from common import settings
from common.paths import REPO_ROOT

TOKEN_FILE = REPO_ROOT / ".api_token"
GUNICORN_CONFIG = REPO_ROOT / "service" / "gunicorn.conf.py"
# The first transaction of the public credit-card dataset: V1..V28, then Amount_scaled.
EXAMPLE_ROW = [
    -1.3598071336738, -0.0727811733098497, 2.53634673796914, 1.37815522427443, -0.338320769942518,
    0.462387777762292, 0.239598554061257, 0.0986979012610507, 0.363786969611213, 0.0907941719789316,
    -0.551599533260813, -0.617800855762348, -0.991389847235408, -0.311169353699879, 1.46817697209427,
    -0.470400525259478, 0.207971241929242, 0.0257905801985637, 0.403992960255733, 0.251412098239705,
    -0.018306777944153, 0.277837575558899, -0.110473910188767, 0.0669280749146731, 0.128539358420671,
    -0.189114843888824, 0.133558376740387, -0.0210530534538215, 0.244964,
]


def load_or_create_token(path: Path = TOKEN_FILE) -> tuple[str, bool]:
    """The token kept in `path`, created (mode 0600) when missing or empty.

    Returns:
        (token, created).
    """
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)  # readable by others: tighten rather than refuse
        return token, False
    token = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, True


def curl_command(base_url: str, authorization: str) -> str:
    """A ready-to-paste curl call of /predict with one valid row."""
    body = json.dumps({"data": [EXAMPLE_ROW]}, separators=(",", ":"))
    return (f"curl -s -X POST {base_url}/predict -H {authorization} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")


def main(argv: list[str] | None = None) -> int:
    """Prepare the token, print the curl command and exec gunicorn (returns only on error).

    Arguments other than `--token-file PATH` (default: .api_token at the repository root) are
    passed on to gunicorn.
    """
    parser = argparse.ArgumentParser(prog="python -m service.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--token-file", type=Path, default=TOKEN_FILE,
                        help="where to keep the generated token when API_TOKEN and API_TOKEN_FILE are unset")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    token_file = args.token_file.resolve()
    try:
        host, port = settings.host(), settings.port()
        if settings.read_str("API_TOKEN") or settings.read_str("API_TOKEN_FILE"):
            if not settings.api_tokens():
                print("API_TOKEN / API_TOKEN_FILE hold no token; refusing to start", file=sys.stderr)
                return 2
            configured_file = settings.read_str("API_TOKEN_FILE")
            source = f"$(head -n 1 {shlex.quote(configured_file)})" if configured_file else "${API_TOKEN%%,*}"
            authorization = f'"Authorization: Bearer {source}"'
            print("Using the API token(s) from the environment.")
        else:
            token, created = load_or_create_token(token_file)
            os.environ["API_TOKEN_FILE"] = str(token_file)
            authorization = shlex.quote(f"Authorization: Bearer {token}")
            print(f"API token ({'created in' if created else 'from'} {token_file}, mode 0600): {token}")
    except settings.SettingsError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - a wildcard bind is reached via loopback
    print(f"Serving on http://{host}:{port} once the workers have loaded the model. Try:\n")
    print(curl_command(f"http://{shown_host}:{port}", authorization) + "\n", flush=True)
    command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONFIG), *extra, "service.app:create_app()"]
    # glibc gives each request thread its own malloc arena, and a large request leaves every arena
    # holding memory; two arenas keep a gthread worker's RSS bounded (set before exec: glibc reads it
    # once, at start).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    os.chdir(REPO_ROOT)
    os.execv(sys.executable, command)  # noqa: S606 - replacing this process with gunicorn is the point
    return 1  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
