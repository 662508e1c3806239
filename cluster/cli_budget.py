"""`tailrace budget status`: tenants' spend today and each rate bucket, from the running cluster's budget
actor or straight from Redis (no cluster needed). It never starts a cluster to ask: with none running
it says how to name one."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rich.markup import escape
from rich.table import Table

from tailrace.cluster import cli_common as common
from tailrace.engine.errors import TailraceError


def register(sub: Any) -> dict[str, Any]:
    budget = sub.add_parser("budget", help="the cluster budget: tenants' spend, rate buckets")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    status = budget_sub.add_parser("status", help="today's spend per tenant and each bucket's state")
    status.add_argument("--address", help="Ray cluster address, e.g. HEAD:6379 (default: RAY_ADDRESS, else the "
                        "cluster `ray start` last started on this machine)")  # fmt: skip
    status.add_argument("--name", default="tailrace-budget", help="budget actor name")
    status.add_argument("--redis-url", help="read the ledger from Redis directly (default: $TAILRACE_REDIS_URL)")
    status.add_argument("--namespace", default="default", help="ledger namespace in Redis")
    status.add_argument("--day", help="UTC day, YYYY-MM-DD (default: today)")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return {"budget": budget_status_command}


def budget_status_command(args: argparse.Namespace) -> int:
    from tailrace.cluster.budget import bucket_rows, budget_status, spend_rows
    from tailrace.policies.budget_config import redact_url

    redis_url = args.redis_url or os.environ.get("TAILRACE_REDIS_URL") or None
    try:
        status = budget_status(
            address=args.address, name=args.name, redis_url=redis_url, namespace=args.namespace, day=args.day
        )
    except (LookupError, TailraceError) as exc:
        common.error(str(exc))
        return common.EXIT_BAD_INPUT
    except Exception as exc:  # never echo a URL with its password
        where = redact_url(redis_url) if redis_url else "the cluster"
        common.error(f"cannot read the budget from {where} ({type(exc).__name__})")
        return common.EXIT_BAD_INPUT
    if args.json:
        common.console.print_json(
            json.dumps(
                {
                    "day": status.day,
                    "backend": status.backend,
                    "leases": status.leases,
                    "spend": spend_rows(status),
                    "buckets": bucket_rows(status),
                },
                default=str,
            )
        )
        return common.EXIT_OK
    spend = Table(title=f"spend on {status.day} (UTC), ledger: {status.backend}")
    for column in ("tenant", "cost $", "input tokens", "output tokens", "attempts", "cancelled", "wasted tokens"):
        spend.add_column(column, justify="right")
    for row in spend_rows(status):
        spend.add_row(
            escape(row["tenant"]),
            f"{row['usd']:.6f}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            f"{row['attempts']:,}",
            f"{row['cancelled']:,}",
            f"{row['wasted_tokens']:,}",
        )
    common.console.print(spend)
    buckets = Table(title=f"buckets ({status.leases} live leases)")
    for column in ("bucket", "limit", "per minute", "free", "leased", "used %"):
        buckets.add_column(column, justify="right")
    for row in bucket_rows(status):
        per_min = "-" if row["per_minute"] != row["per_minute"] else f"{row['per_minute']:,.0f}"
        buckets.add_row(
            escape(row["bucket"]),
            f"{row['capacity']:,.4g}",
            per_min,
            f"{row['free']:,.4g}",
            f"{row['leased']:,.4g}",
            f"{100 * row['utilisation']:.0f}",
        )
    common.console.print(buckets)
    return common.EXIT_OK
