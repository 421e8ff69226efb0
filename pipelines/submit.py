"""`python -m pipelines submit`: a pipeline command run on a Ray cluster through the Ray Jobs SDK."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Gitignore-style patterns relative to the working dir; a leading "/" anchors them so that `gan/data/` stays.
EXCLUDES = ["/.venv", "/venv", ".git", "/data", "/runs", "mlruns", "mlflow.db", "*.parquet", "__pycache__",
            ".pytest_cache", ".ruff_cache", "*.egg-info"]
K8S_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(Exception):
    """A problem the user fixes before anything runs: printed without a traceback, exit code 2."""


@dataclass(frozen=True)
class Token:
    """An authentication token and where it came from (for messages; never print the value)."""

    value: str
    source: str


def project_root() -> Path:
    """The folder holding pyproject.toml: this checkout, else the current folder or the nearest parent with one."""
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").is_file():
        return here
    cwd = Path.cwd().resolve()
    return next((p for p in (cwd, *cwd.parents) if (p / "pyproject.toml").is_file()), cwd)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `submit`; everything after `--` is the pipeline command the job runs."""
    parser.usage = "python -m pipelines submit [--address URL] [options] -- run --config configs/NAME.yaml [...]"
    parser.add_argument("--address", default=None,
                        help="Ray dashboard (Jobs API) address, e.g. http://HOST:8265 "
                             "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    parser.add_argument("--working-dir", default=None,
                        help="folder uploaded as the job's working dir (default: the project root, "
                             "the folder holding pyproject.toml)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable of the job (repeatable); MLFLOW_TRACKING_URI is forwarded "
                             "from this shell when set")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without waiting")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop the job when it has not finished after SECONDS (default: wait for it)")
    parser.add_argument("pipeline_args", nargs=argparse.REMAINDER,
                        help="the pipeline command after `--`, e.g. -- run --config configs/ring8.yaml")


def resolve_address(address: str | None, environ: Mapping[str, str]) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (the order `ray job submit` uses)."""
    found = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not found:
        raise SubmitError("no Ray cluster address: pass --address http://HOST:8265 (the head's dashboard port) "
                          "or set RAY_ADDRESS")
    return found.rstrip("/")


def parse_env(pairs: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The job's env_vars: --env KEY=VALUE pairs, plus MLFLOW_TRACKING_URI from this shell unless given."""
    env = {"PYTHONUNBUFFERED": "1"}  # the driver's stdout is a file: unbuffered, the logs stream as they happen
    if environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = environ["MLFLOW_TRACKING_URI"]
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise SubmitError(f"--env expects KEY=VALUE with KEY a variable name, got {pair!r}")
        env[key] = value
    return env


# Ray 2.60 has no public API for this lookup (its loader is the internal ray._raylet.AuthenticationTokenLoader).
def find_token(environ: Mapping[str, str]) -> Token | None:
    """The token Ray's AuthenticationTokenLoader would load, in its order; None when there is none.

    1. RAY_AUTH_TOKEN; 2. the file named by RAY_AUTH_TOKEN_PATH (an error when it is missing or empty);
    3. the Kubernetes service account token when RAY_ENABLE_K8S_TOKEN_AUTH is on; 4. $HOME/.ray/auth_token.
    Files are read by their first line, and values are stripped of whitespace, as Ray does.
    """
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = environ["RAY_AUTH_TOKEN_PATH"]
        value = _first_line(Path(path))
        if not value:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH is set but {path} cannot be read or is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path}")
    if environ.get("RAY_ENABLE_K8S_TOKEN_AUTH", "").lower() in ("1", "true"):
        value = _first_line(Path(K8S_TOKEN_PATH))
        if value:
            return Token(value, K8S_TOKEN_PATH)
    default = default_token_path(environ)
    value = _first_line(default)
    return Token(value, str(default)) if value else None


def default_token_path(environ: Mapping[str, str]) -> Path:
    """$HOME/.ray/auth_token, where `ray start --head` and `ray get-auth-token --generate` write the token."""
    home = environ.get("HOME")
    return Path(home if home else ".") / ".ray" / "auth_token"


def _first_line(path: Path) -> str:
    try:
        with path.open() as f:
            return f.readline().strip()
    except OSError:
        return ""


def missing_token_message(address: str, environ: Mapping[str, str]) -> str:
    """What to set when the head demands a token this shell does not have."""
    return (f"the Ray cluster at {address} requires an authentication token (token auth is on by default for "
            f"`ray start --head` in Ray 2.60) and none was found. Print it on the head with `ray get-auth-token`, "
            f"then either export RAY_AUTH_TOKEN=<token>, or save it to a file and export "
            f"RAY_AUTH_TOKEN_PATH=<file>, or save it to {default_token_path(environ)}."
            + (" Unset RAY_AUTH_MODE=disabled: it keeps the token from being sent."
               if environ.get("RAY_AUTH_MODE", "").lower() == "disabled" else ""))


def rejected_token_message(address: str, token: Token) -> str:
    return (f"the Ray cluster at {address} rejected the authentication token from {token.source}: it is not this "
            f"cluster's token. Get the right one on the head with `ray get-auth-token` and put it in RAY_AUTH_TOKEN.")


def auth_headers(token: Token | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The Authorization header for the Jobs API; none when RAY_AUTH_MODE=disabled or there is no token.

    Ray's own client sends its token only when RAY_AUTH_MODE=token in the client's shell; sending the token we
    found makes `submit` work against a default `ray start --head` without that extra variable.
    """
    if token is None or environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    return {"Authorization": f"Bearer {token.value}"}


def pipeline_command(argv: list[str], working_dir: Path) -> list[str]:
    """The pipeline arguments after `--`, validated here as `python -m pipelines` would validate them there."""
    from gan.config import ConfigError
    from gan.config_loader import load_config
    from pipelines.cli import _parser

    argv = argv[1:] if argv[:1] == ["--"] else list(argv)
    if not argv:
        raise SubmitError("no pipeline command: add it after `--`, e.g. -- run --config configs/quickstart.yaml")
    if argv[0] == "submit":
        raise SubmitError("`submit` cannot submit itself: give the pipeline command after `--`, e.g. -- run ...")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as err:  # argparse has printed the help (code 0: let it exit) or the usage and the error
        if not err.code:
            raise
        raise SubmitError(f"invalid pipeline command: {shlex.join(argv)}") from err
    if args.command == "run":
        # The job runs in the uploaded working dir, so a relative config path is read from there.
        config = Path(args.config) if Path(args.config).is_absolute() else working_dir / args.config
        try:
            load_config(config, args.overrides)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            raise SubmitError(f"config error: {err}") from err
    return argv


def entrypoint(argv: list[str]) -> str:
    """The shell command the job runs in its working dir, with the head's `python`."""
    return shlex.join(["python", "-m", "pipelines", *argv])


def runtime_env(working_dir: Path, env_vars: dict[str, str]) -> dict:
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": dict(env_vars)}


def main(args: argparse.Namespace) -> int:
    """Validates the pipeline command, submits it, streams its logs; 0 when the job SUCCEEDED, else 1 (2: bad input)."""
    environ = os.environ
    try:
        working_dir = Path(args.working_dir).resolve() if args.working_dir else project_root()
        if not working_dir.is_dir():
            raise SubmitError(f"--working-dir {working_dir} is not a folder")
        argv = pipeline_command(args.pipeline_args, working_dir)
        address = resolve_address(args.address, environ)
        from pipelines.model_registry import git_commit

        # The uploaded working dir has no .git: the registered version's git_commit tag comes from here.
        env_vars = {"RAYGAN_GIT_COMMIT": git_commit(), **parse_env(args.env, environ)}
        token = find_token(environ)
        if token is None and environ.get("RAY_AUTH_MODE", "").lower() == "token":
            # Ray's HTTP client would abort the process (a C++ check) in this state; say what is missing instead.
            raise SubmitError(missing_token_message(address, environ))
    except SubmitError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    return _submit(address, auth_headers(token, environ), token, argv, runtime_env(working_dir, env_vars), args)


def _submit(address: str, headers: dict[str, str], token: Token | None, argv: list[str], env: dict,
            args: argparse.Namespace) -> int:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    job_id = None
    # Ray's own CLI sends its token only under RAY_AUTH_MODE=token, so the commands we suggest say so.
    ray = "RAY_AUTH_MODE=token ray" if headers else "ray"
    try:
        client = JobSubmissionClient(address, headers=headers)
        job_id = client.submit_job(entrypoint=entrypoint(argv), runtime_env=env)
        print(f"[submit] job {job_id} submitted to {address}: {entrypoint(argv)}", flush=True)
        if args.no_wait:
            print(f"[submit] follow it with `{ray} job logs -f {job_id} --address {address}`")
            return 0
        status = asyncio.run(_follow(client, job_id, args.timeout))
    except AuthenticationError as err:
        rejected = token is not None and "Authentication failed" in str(err)
        message = rejected_token_message(address, token) if rejected else missing_token_message(address, os.environ)
        print(f"submit: {message}", file=sys.stderr)
        return 1
    except ConnectionError as err:
        print(f"submit: cannot reach the Ray Jobs API at {address}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if job_id is None:
            print("\n[submit] interrupted before the job was submitted", file=sys.stderr)
        else:
            print(f"\n[submit] job {job_id} keeps running on the cluster. Follow it with `{ray} job logs -f {job_id} "
                  f"--address {address}`, stop it with `{ray} job stop {job_id} --address {address}`", file=sys.stderr)
        return 130
    # The message of a failed job repeats the tail of its logs, already streamed above: its first line says it.
    message = (client.get_job_info(job_id).message or "").strip().splitlines() if status != "SUCCEEDED" else []
    detail = f": {message[0].split(', last available logs')[0]}" if message else ""
    print(f"[submit] job {job_id} {status}{detail}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


async def _follow(client, job_id: str, timeout: float | None) -> str:
    """Streams the job's logs to stdout until it ends (or `timeout` passes: then stops it); its final status."""
    async def stream() -> None:
        try:
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)
        except RuntimeError as err:  # the log stream broke; the job's status below still tells how it ended
            print(f"\n[submit] lost the log stream of job {job_id}: {err}", file=sys.stderr, flush=True)

    try:
        await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        print(f"\n[submit] job {job_id} still running after {timeout:g}s: stopping it", flush=True)
        client.stop_job(job_id)
    # The log stream can close a moment before the job's status turns terminal.
    deadline = time.monotonic() + 60
    while (status := client.get_job_status(job_id).value) not in TERMINAL and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return status
