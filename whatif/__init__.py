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

from tailrace.whatif.change import WhatIf
from tailrace.whatif.fit import TraceFit, fit_trace
from tailrace.whatif.prediction import Estimate, Metrics, Prediction, predict
from tailrace.whatif.replay import Replay, ReplayPlan
from tailrace.whatif.sampled import SampledAdapter, SampledProvider
from tailrace.whatif.search import TuneResult, tune
from tailrace.whatif.survival import fit_mixture, kaplan_meier
from tailrace.whatif.trace_data import TraceData, read_trace
from tailrace.whatif.virtual_time import run_on_fake_time

__all__ = [
    "Estimate",
    "Metrics",
    "Prediction",
    "Replay",
    "ReplayPlan",
    "SampledAdapter",
    "SampledProvider",
    "TraceData",
    "TraceFit",
    "TuneResult",
    "WhatIf",
    "fit_mixture",
    "fit_trace",
    "kaplan_meier",
    "predict",
    "read_trace",
    "run_on_fake_time",
    "tune",
]
