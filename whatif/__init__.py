"""tailrace.whatif: predict what a change of policy does to a workflow's tail, from a trace, before deploying it.

A trace written by `tailrace run` is fitted (`fit_trace`: per model, censored latency mixtures,
error rates and invalid answers over the batch's time) and replayed on fake time
(`run_on_fake_time`): the workflow's DAG through the real step runner, tail control, spend gates and
budget (`Replay`) against a provider that answers from the fit (`SampledProvider`), thousands of
runs per CPU second, no Ray, no sockets. `predict` says what a `WhatIf` does to the hit rate,
latency quantiles, extra tokens, cost and 429s, with intervals; `tune` searches for the cheapest
tail control that meets a target. `tailrace.what_if` / `tailrace.tune` (and the `tailrace whatif` /
`tailrace tune` commands) are the same with the cluster's budget admission plugged in.
"""

from __future__ import annotations

from tailrace.engine._lazy import lazy_exports

_EXPORTS = {
    "Estimate": "tailrace.whatif.prediction",
    "Metrics": "tailrace.whatif.prediction",
    "Prediction": "tailrace.whatif.prediction",
    "Replay": "tailrace.whatif.replay",
    "ReplayPlan": "tailrace.whatif.replay",
    "SampledAdapter": "tailrace.whatif.sampled",
    "SampledProvider": "tailrace.whatif.sampled",
    "TraceData": "tailrace.whatif.trace_data",
    "TraceFit": "tailrace.whatif.fit",
    "TuneResult": "tailrace.whatif.search",
    "WhatIf": "tailrace.whatif.change",
    "fit_mixture": "tailrace.whatif.survival",
    "fit_trace": "tailrace.whatif.fit",
    "kaplan_meier": "tailrace.whatif.survival",
    "predict": "tailrace.whatif.prediction",
    "read_trace": "tailrace.whatif.trace_data",
    "run_on_fake_time": "tailrace.whatif.virtual_time",
    "tune": "tailrace.whatif.search",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
