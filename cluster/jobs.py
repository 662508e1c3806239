"""Batches as Ray jobs: submit a workflow batch to a cluster through Ray's Job Submission API, follow
it (status, logs) and fetch its results.

Client side: `submit` ships the working directory (the workflow and inputs inside it) and tailrace's
own packages in the job's runtime env, plus any pip dependencies; Ray's auth token is sent when one
is configured. The submission id is derived from the workflow, the inputs and the options, so
submitting the same batch again names the same batch: while one of its jobs runs nothing new is
submitted; once it ended (finished, failed or stopped) the next attempt runs as the Ray job
`<id>.2`, `<id>.3`, ... and skips the runs already in the batch's results file (results are written
as runs finish, so an interrupted batch loses nothing). `status`, `logs`, `stop` and `results` take
the batch id and follow its latest attempt. (Reusing the Ray job id itself is unsafe: the stopped
job's supervisor actor can still hold its name while the new job starts.)

Job side (`python -m tailrace.cluster.jobs run ...`, the entrypoint): runs the batch with `run_batch` on the
cluster, writing `results.jsonl`, `results.trace.jsonl` and `summary.json` under
`<results-dir>/<submission id>/` on the node the job driver runs on (the head node), and prints
progress lines that `tailrace status` and `tailrace logs` show. `fetch_results` reads that directory
directly when this machine can see it (a local cluster, shared storage), else through a short helper
job that prints the file into its logs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import gzip
import hashlib
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tailrace.engine.clock import SYSTEM_CLOCK
from tailrace.engine.errors import InputError, TailraceError

DEFAULT_RESULTS_DIR = "~/.tailrace/jobs"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBPACKAGES = ("engine", "policies", "runtime", "actors", "cluster")
PROGRESS_PREFIX = "tailrace progress:"
SUMMARY_PREFIX = "tailrace summary:"
_BEGIN, _END = "-----BEGIN TAILRACE FILE-----", "-----END TAILRACE FILE-----"
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobError(TailraceError):
    """A job operation failed (cluster unreachable, unknown job, rejected submission)."""


@dataclass(frozen=True)
class BatchArgs:
    """What the job runs: the job-side command line, built on the client, parsed on the cluster."""

    workflow: str  # relative to the working dir
    inputs: str
    options: Mapping[str, Any]  # RunOptions overrides (deadline_s, max_cost_usd, tenant)
    concurrency: int = 64
    scenario: str | None = None
    seed: int = 0
    time_scale: float = 1.0
    pool: Mapping[str, Any] | None = None  # PoolConfig fields
    redact_prompts: bool = False

    def argv(self, submission_id: str, results_dir: str) -> list[str]:
        argv = [
            "run",
            "--workflow",
            self.workflow,
            "--inputs",
            self.inputs,
            "--submission-id",
            submission_id,
            "--results-dir",
            results_dir,
            "--concurrency",
            str(self.concurrency),
            "--options",
            json.dumps(dict(self.options), sort_keys=True),
        ]
        if self.scenario:
            argv += ["--scenario", self.scenario, "--seed", str(self.seed), "--time-scale", repr(self.time_scale)]
        if self.pool:
            argv += ["--pool", json.dumps(dict(self.pool), sort_keys=True)]
        if self.redact_prompts:
            argv.append("--redact-prompts")
        return argv

    def identity(self) -> dict[str, Any]:
        """What decides the results (and so the submission id); executor sizing does not."""
        return {
            "options": dict(self.options),
            "scenario": self.scenario,
            "seed": self.seed,
            "time_scale": self.time_scale,
        }


def submission_id_for(workflow: Path, inputs: Path, args: BatchArgs) -> str:
    """`tailrace-<workflow name>-<hash of workflow, inputs and options>`: the same batch, the same id."""
    digest = hashlib.sha256()
    for part in (workflow.read_bytes(), inputs.read_bytes(), json.dumps(args.identity(), sort_keys=True).encode()):
        digest.update(hashlib.sha256(part).digest())
    from tailrace.engine.loading import load_workflow

    name = re.sub(r"[^a-z0-9-]+", "-", load_workflow(workflow).name.lower()).strip("-") or "batch"
    return f"tailrace-{name}-{digest.hexdigest()[:12]}"


# -- client side -------------------------------------------------------------------------------


def auth_headers() -> dict[str, str]:
    """Ray's auth token as a bearer header, from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

    Sent whenever a token is configured (unless RAY_AUTH_MODE=disabled), so a client machine that never
    ran Ray itself still reaches a token-protected cluster. The token is never printed or logged.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def default_address() -> str:
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def job_python(python: str | None, address: str | None) -> tuple[str, bool]:
    """The interpreter a job runs with, and whether it is known to have Ray: `python` as given; else this
    process's own when the job server is on this machine (the cluster was started from this install,
    activated or not); else `python` on the head node's PATH, to be checked before the batch starts."""
    if python:
        return python, False
    if _is_this_machine(urllib.parse.urlparse(address or default_address()).hostname or ""):
        return sys.executable, True
    return "python", False


def _is_this_machine(host: str) -> bool:
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", socket.gethostname()):
        return True
    try:
        return host in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


def entrypoint(python: str, verified: bool, argv: Sequence[str]) -> str:
    """The job's shell command; an interpreter not known to have Ray is checked first, so a job on the
    wrong one fails at once with what to do instead of a traceback."""
    command = " ".join(shlex.quote(a) for a in [python, "-m", "tailrace.cluster.jobs", *argv])
    if verified:
        return command
    py = shlex.quote(python)
    advice = shlex.quote(
        f"tailrace: {python!r} on the head node cannot import ray: pass --python with the interpreter "
        "the cluster runs on (e.g. /path/to/venv/bin/python)"
    )
    return f"{py} -c 'import ray' >/dev/null 2>&1 || {{ echo {advice}; exit 3; }}; exec {command}"


def client(address: str | None = None) -> Any:
    from ray.job_submission import JobSubmissionClient

    address = address or default_address()
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # requests' connection errors, Ray's version/auth checks
        raise JobError(f"cannot reach the Ray job server at {address}: {_first_line(exc)}") from None


def runtime_env(
    working_dir: Path | None,
    *,
    ship_tailrace: bool = True,
    pip: Sequence[str] = (),
    env_vars: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The job's runtime env: the working dir, tailrace's own packages (so a cluster without tailrace
    installed runs it) and pip dependencies. Never API keys: the runtime env is visible in the
    dashboard; nodes take keys from their own environment."""
    env: dict[str, Any] = {"working_dir": str(working_dir)} if working_dir else {}
    if ship_tailrace:
        env["py_modules"] = [str(tailrace_package_dir())]
    if pip:
        env["pip"] = list(pip)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


@functools.cache
def tailrace_package_dir() -> Path:
    """A directory named `tailrace` holding the whole package, for a job's `py_modules`.

    An installed wheel already has one. An editable install maps the sub-packages from the repository's
    root folders, so they are copied into one staged tree (once per process, without bytecode caches).
    """
    import tailrace

    installed = Path(tailrace.__file__).resolve().parent
    if all((installed / sub / "__init__.py").is_file() for sub in SUBPACKAGES):
        return installed
    staged = Path(tempfile.mkdtemp(prefix="tailrace-ship-")) / "tailrace"
    shutil.copytree(installed, staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for sub in SUBPACKAGES:
        source = Path(importlib.import_module(f"tailrace.{sub}").__path__[0])
        shutil.copytree(source, staged / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return staged


def forwarded_env() -> dict[str, str]:
    """Provider endpoints set here (not keys) travel with the job."""
    names = ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "RAY_AUTH_MODE")
    return {n: os.environ[n] for n in names if os.environ.get(n)}


@dataclass(frozen=True)
class Submission:
    submission_id: str  # the batch's id (what the user keeps)
    job_id: str  # the Ray job of this attempt: the batch id, then <id>.2, <id>.3, ...
    action: str  # submitted | resubmitted | already_running
    status: str


def _attempt_number(batch_id: str, job_id: str | None) -> int | None:
    if job_id == batch_id:
        return 1
    if job_id and job_id.startswith(batch_id + "."):
        tail = job_id[len(batch_id) + 1 :]
        return int(tail) if tail.isdigit() else None
    return None


def attempts(jobs: Any, batch_id: str) -> list[tuple[int, str, str]]:
    """(attempt, Ray job id, status) of every job of a batch, oldest first."""
    found = []
    for job in jobs.list_jobs():
        n = _attempt_number(batch_id, job.submission_id)
        if n is not None:
            found.append((n, str(job.submission_id), str(job.status.value)))
    return sorted(found)


def latest_job(jobs: Any, batch_id: str) -> str:
    """The Ray job id of a batch's latest attempt (a Ray job id is accepted as is)."""
    found = attempts(jobs, batch_id)
    if not found:
        raise JobError(f"no job {batch_id!r} on this cluster")
    return found[-1][1]


def submit(
    workflow: str | Path,
    inputs: str | Path,
    args: BatchArgs | None = None,
    *,
    address: str | None = None,
    submission_id: str | None = None,
    working_dir: str | Path | None = None,
    python: str | None = None,
    pip: Sequence[str] = (),
    ship_tailrace: bool = True,
    results_dir: str = DEFAULT_RESULTS_DIR,
) -> Submission:
    """Submit a batch as a Ray job (idempotent: see the module docstring). `python`: the head node's
    interpreter (default: see `job_python`)."""
    workflow, inputs = Path(workflow).resolve(), Path(inputs).resolve()
    for what, path in (("workflow", workflow), ("inputs", inputs)):
        if not path.is_file():
            raise InputError(f"{what} file {str(path)!r} does not exist")
    root = Path(working_dir).resolve() if working_dir else workflow.parent
    rel = {}
    for what, path in (("workflow", workflow), ("inputs", inputs)):
        try:
            rel[what] = str(path.relative_to(root))
        except ValueError:
            raise InputError(
                f"the {what} file {str(path)!r} is outside the working dir {str(root)!r}: "
                "pass --working-dir with a directory that holds both"
            ) from None
    args = replace(args or BatchArgs("", "", {}), workflow=rel["workflow"], inputs=rel["inputs"])
    sid = submission_id or submission_id_for(workflow, inputs, args)
    jobs = client(address)
    earlier = attempts(jobs, sid)
    if earlier and earlier[-1][2] not in _TERMINAL:
        return Submission(sid, earlier[-1][1], "already_running", earlier[-1][2])
    job_id = f"{sid}.{earlier[-1][0] + 1}" if earlier else sid
    entrypoint_command = entrypoint(*job_python(python, address), args.argv(sid, results_dir))
    try:
        _submit_job(
            jobs,
            entrypoint=entrypoint_command,
            submission_id=job_id,
            runtime_env=runtime_env(root, ship_tailrace=ship_tailrace, pip=pip, env_vars=forwarded_env()),
            metadata={"tailrace": "batch", "batch": sid, "workflow": rel["workflow"], "inputs": rel["inputs"]},
        )
    except RuntimeError as exc:
        if "already exists" in str(exc):  # a concurrent submit of the same batch won the race
            return Submission(sid, job_id, "already_running", _job_status(jobs, job_id) or "PENDING")
        raise JobError(f"the cluster refused the job: {_first_line(exc)}") from None
    return Submission(sid, job_id, "resubmitted" if earlier else "submitted", "PENDING")


def _submit_job(jobs: Any, *, patience_s: float = 60.0, **kwargs: Any) -> None:
    """Submit, waiting (bounded) while a freshly started head has no job agent registered yet."""
    end = SYSTEM_CLOCK.monotonic() + patience_s
    while True:
        try:
            jobs.submit_job(**kwargs)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or SYSTEM_CLOCK.monotonic() >= end:
                raise
            time.sleep(0.5)


def _job_status(jobs: Any, sid: str) -> str | None:
    try:
        return str(jobs.get_job_status(sid).value)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise JobError(f"cannot read job {sid}: {_first_line(exc)}") from None


@dataclass(frozen=True)
class JobState:
    submission_id: str
    job_id: str  # its latest attempt
    attempts: int
    status: str
    message: str
    start_time: float | None
    end_time: float | None
    progress: str | None  # the job's last progress line
    summary: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def status(submission_id: str, address: str | None = None) -> JobState:
    jobs = client(address)
    found = attempts(jobs, submission_id)
    if not found:
        raise JobError(f"no job {submission_id!r} on this cluster")
    job_id = found[-1][1]
    try:
        info = jobs.get_job_info(job_id)
        text = jobs.get_job_logs(job_id)
    except RuntimeError as exc:
        raise JobError(f"no job {submission_id!r} on this cluster ({_first_line(exc)})") from None
    progress = summary = None
    for line in text.splitlines():
        if line.startswith(PROGRESS_PREFIX):
            progress = line[len(PROGRESS_PREFIX) :].strip()
        elif line.startswith(SUMMARY_PREFIX):
            with contextlib.suppress(ValueError):
                summary = json.loads(line[len(SUMMARY_PREFIX) :])
    ms = 1000.0
    return JobState(
        submission_id,
        job_id,
        len(found),
        str(info.status.value),
        info.message or "",
        info.start_time / ms if info.start_time else None,
        info.end_time / ms if info.end_time else None,
        progress,
        summary,
    )


def logs(submission_id: str, address: str | None = None, follow: bool = False) -> Iterator[str]:
    jobs = client(address)
    job_id = latest_job(jobs, submission_id)
    try:
        if not follow:
            yield jobs.get_job_logs(job_id)
            return
        import asyncio

        async def collect() -> None:
            async for chunk in jobs.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        asyncio.run(collect())
    except RuntimeError as exc:
        raise JobError(f"no logs for job {submission_id!r}: {_first_line(exc)}") from None


def stop(submission_id: str, address: str | None = None) -> bool:
    jobs = client(address)
    try:
        return bool(jobs.stop_job(latest_job(jobs, submission_id)))
    except RuntimeError as exc:
        raise JobError(f"cannot stop job {submission_id!r}: {_first_line(exc)}") from None


def wait(submission_id: str, address: str | None = None, timeout_s: float = 3600.0, poll_s: float = 0.5) -> str:
    """Block until the batch's latest job is terminal (or the timeout passes); its status."""
    jobs = client(address)
    job_id = latest_job(jobs, submission_id)
    end = SYSTEM_CLOCK.monotonic() + timeout_s
    while True:
        current = _job_status(jobs, job_id) or "UNKNOWN"
        if current in _TERMINAL or SYSTEM_CLOCK.monotonic() >= end:
            return current
        time.sleep(poll_s)


def job_dir(results_dir: str | Path, submission_id: str) -> Path:
    return Path(results_dir).expanduser() / submission_id


FILES = {"results": "results.jsonl", "trace": "results.trace.jsonl", "summary": "summary.json"}


def fetch_results(
    submission_id: str,
    out: str | Path,
    *,
    address: str | None = None,
    results_dir: str = DEFAULT_RESULTS_DIR,
    what: str = "results",
    python: str | None = None,
    via_job: bool | None = None,
    timeout_s: float = 300.0,
) -> Path:
    """Copy a job's results (or trace, or summary) to `out`: directly when this machine sees the job's
    results directory (a local cluster or shared storage), else through a helper job."""
    source = job_dir(results_dir, submission_id) / FILES[what]
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    if via_job is None:
        via_job = not source.is_file()
    if not via_job:
        if not source.is_file():
            raise JobError(f"no {what} for job {submission_id!r} at {source}")
        target.write_bytes(source.read_bytes())
        return target
    jobs = client(address)
    helper = f"{submission_id}-fetch-{uuid.uuid4().hex[:8]}"
    argv = ["cat", "--submission-id", submission_id, "--results-dir", results_dir, "--what", what]
    _submit_job(
        jobs,
        entrypoint=entrypoint(*job_python(python, address), argv),
        submission_id=helper,
        runtime_env=runtime_env(None, ship_tailrace=True),
        metadata={"tailrace": "fetch"},
    )
    try:
        final = wait(helper, address, timeout_s=timeout_s)
        text = jobs.get_job_logs(helper)
    finally:
        with contextlib.suppress(Exception):
            jobs.delete_job(helper)
    if _BEGIN not in text:
        reason = text.strip().splitlines()[-1] if text.strip() else final
        raise JobError(f"could not fetch {what} of job {submission_id!r}: {reason}")
    body = text.split(_BEGIN, 1)[1].split(_END, 1)[0]
    target.write_bytes(gzip.decompress(base64.b64decode("".join(body.split()))))
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# -- job side ----------------------------------------------------------------------------------


def _job_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tailrace.cluster.jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--workflow", required=True)
    run.add_argument("--inputs", required=True)
    run.add_argument("--submission-id", required=True)
    run.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR)
    run.add_argument("--concurrency", type=int, default=64)
    run.add_argument("--options", default="{}")
    run.add_argument("--pool", default=None)
    run.add_argument("--scenario")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--time-scale", type=float, default=1.0)
    run.add_argument("--redact-prompts", action="store_true")
    cat = sub.add_parser("cat")
    cat.add_argument("--submission-id", required=True)
    cat.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR)
    cat.add_argument("--what", choices=sorted(FILES), default="results")
    return parser


def job_main(argv: Sequence[str] | None = None) -> int:
    args = _job_parser().parse_args(argv)
    if args.command == "cat":
        path = job_dir(args.results_dir, args.submission_id) / FILES[args.what]
        if not path.is_file():
            print(f"no such file: {path}")
            return 1
        encoded = base64.b64encode(gzip.compress(path.read_bytes())).decode()
        print(_BEGIN)
        for i in range(0, len(encoded), 76):
            print(encoded[i : i + 76])
        print(_END, flush=True)
        return 0
    return _run_job(args)


def _run_job(args: argparse.Namespace) -> int:
    from tailrace.cluster.api import run_batch
    from tailrace.cluster.config import BatchConfig
    from tailrace.cluster.engine import load_workflow_beside, shipped_module_names
    from tailrace.cluster.pool import PoolConfig
    from tailrace.cluster.providers import SimulatorEndpoints
    from tailrace.cluster.report import read_results
    from tailrace.cluster.results import BatchSummary, finished_run_ids
    from tailrace.cluster.trace import TraceConfig, default_trace_path
    from tailrace.engine.loading import load_inputs
    from tailrace.engine.spec_checks import allow_schema_modules
    from tailrace.engine.specs import RunOptions

    # Absolute now: joining the cluster can change the working directory of this process.
    args.workflow, args.inputs = str(Path(args.workflow).resolve()), str(Path(args.inputs).resolve())
    workflow, beside = load_workflow_beside(args.workflow)
    # Modules beside the workflow travelled with the job (its working directory): the user shipped them, so
    # the schema models the spec names from them may be imported (`tailrace.engine.spec_checks`).
    allow_schema_modules(shipped_module_names(beside))
    options = RunOptions(**{**workflow.defaults.model_dump(), **json.loads(args.options)})
    pool = PoolConfig(**json.loads(args.pool)) if args.pool else PoolConfig()
    directory = job_dir(args.results_dir, args.submission_id)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / FILES["results"]
    total = sum(1 for _ in load_inputs(args.inputs))
    skipped = len(finished_run_ids(out))
    print(
        f"tailrace job {args.submission_id}: {total} records, {skipped} already finished (skipped); results in {out}",
        flush=True,
    )
    counts = {"finished": 0, "delivered": 0}
    last = [0.0]

    def progress(outcome: Any, force: bool = False) -> None:
        if outcome is not None:
            counts["finished"] += 1
            counts["delivered"] += outcome.delivered
        now = SYSTEM_CLOCK.monotonic()
        if force or now - last[0] >= 2.0:
            last[0] = now
            done = skipped + counts["finished"]
            print(
                f"{PROGRESS_PREFIX} {done}/{total} runs finished ({counts['finished']} this job, "
                f"{counts['delivered']} delivered, {skipped} skipped)",
                flush=True,
            )

    with contextlib.ExitStack() as stack:
        simulator = None
        if args.scenario:
            from tailrace.engine.sim import SimServer, scenario

            sim = stack.enter_context(
                SimServer.in_thread(scenario(args.scenario, seed=args.seed, time_scale=args.time_scale))
            )
            simulator = SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)
            print(f"using the built-in provider simulator: scenario {args.scenario!r}", flush=True)
        config = BatchConfig(
            pool=pool,
            max_in_flight=args.concurrency,
            trace=TraceConfig(path=str(default_trace_path(out)), redact_prompts=args.redact_prompts),
        )
        summary = run_batch(
            workflow, args.inputs, options=options, out=out, config=config, providers=simulator, on_done=progress
        )
    progress(None, force=True)
    whole = BatchSummary()  # over every run in the results file, this job's and earlier ones'
    for outcome in read_results(out):
        whole.add(outcome)
    result = {
        "submission_id": args.submission_id,
        "records": total,
        "skipped": skipped,
        "this_job": summary.runs,
        "runs": whole.runs,
        "delivered": whole.delivered,
        "on_time": whole.on_time,
        "failures": whole.failures,
        "cost_usd": whole.cost_usd,
        "percentiles": whole.percentiles(),
    }
    (directory / FILES["summary"]).write_text(json.dumps(result, indent=2))
    print(SUMMARY_PREFIX + " " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(job_main())
