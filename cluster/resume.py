"""Resuming a batch from its results file, only when it is the same batch.

A results file records which batch wrote it in a sidecar (`results.jsonl` -> `results.batch.json`):
digests of the workflow, of the inputs and the run options, as `tailrace submit` derives a batch id.
Running the same batch again skips the runs already in the file (an interrupted batch loses nothing
and runs nothing twice). A different batch (another workflow, other inputs, another deadline, ...) is
refused with what differs, until the caller asks for a fresh run, which clears the file, its trace and
its sidecar, or names another file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailrace.cluster.results import finished_run_ids
from tailrace.cluster.trace import default_trace_path, workflow_json
from tailrace.engine.errors import InputError
from tailrace.engine.specs import RunOptions, WorkflowSpec


@dataclass(frozen=True)
class BatchIdentity:
    workflow: str  # sha256 of the spec's canonical JSON
    inputs: str | None  # sha256 of the inputs file; None when records come from Python
    options: dict[str, Any]

    @classmethod
    def of(cls, workflow: WorkflowSpec, inputs: str | Path | None, options: RunOptions) -> BatchIdentity:
        spec = json.dumps(workflow_json(workflow), sort_keys=True).encode()
        data = _file_digest(Path(inputs)) if inputs is not None else None
        return cls(hashlib.sha256(spec).hexdigest(), data, options.model_dump(mode="json"))

    def differences(self, earlier: BatchIdentity) -> list[str]:
        found = []
        if earlier.workflow != self.workflow:
            found.append("the workflow changed")
        if earlier.inputs != self.inputs and None not in (earlier.inputs, self.inputs):
            found.append("the inputs changed")
        for name in sorted(set(earlier.options) | set(self.options)):
            before, now = earlier.options.get(name), self.options.get(name)
            if before != now:
                found.append(f"{name} {before} -> {now}")
        return found

    def as_json(self) -> dict[str, Any]:
        return {"workflow": self.workflow, "inputs": self.inputs, "options": self.options}


@dataclass(frozen=True)
class Resume:
    skip: set[str]  # run ids already in the results file: not run again
    note: str | None  # what was skipped and why (None: nothing to say)


def sidecar_path(results: str | Path) -> Path:
    p = Path(results)
    return p.with_name(p.name.removesuffix(".jsonl") + ".batch.json")


def resume(
    results: str | Path, identity: BatchIdentity, *, fresh: bool = False, trace: str | Path | None = None
) -> Resume:
    """What a batch writing to `results` skips; raises `InputError` when the file holds another batch."""
    path = Path(results)
    if fresh:
        for stale in (path, sidecar_path(path), Path(trace) if trace else default_trace_path(path)):
            stale.unlink(missing_ok=True)
    done = finished_run_ids(path)
    earlier = _read(sidecar_path(path))
    if done and earlier is not None and (changed := identity.differences(earlier)):
        raise InputError(
            f"{path} holds {len(done)} runs of another batch ({'; '.join(changed)}): start over with "
            "--fresh (fresh=True in Python), or write to another file (--out)"
        )
    _write(sidecar_path(path), identity)
    if not done:
        return Resume(set(), None)
    why = "the same workflow, inputs and options" if earlier is not None else "an earlier batch of unknown options"
    return Resume(
        done,
        f"{path} already holds {len(done)} finished runs of {why}: skipping them "
        "(--fresh, or fresh=True in Python, runs them again)",
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path) -> BatchIdentity | None:
    try:
        data = json.loads(path.read_text())
        return BatchIdentity(data["workflow"], data.get("inputs"), dict(data["options"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, identity: BatchIdentity) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity.as_json(), indent=2, sort_keys=True) + "\n")
