"""The user code examples/refund_check/workflow.yaml names by import path ("checks:..."): a schema model
and a validator. It runs where validation runs, on the step executors: `tailrace run` and `run_batch`
ship this module with them because it sits next to the workflow file."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class RefundDecision(BaseModel):
    ticket_id: str
    refund: bool
    amount_usd: float = Field(ge=0, le=100)


def within_order_total(value: Any, text: str, inputs: dict[str, Any]) -> str | None:
    """A refund never exceeds what the order cost: a reason to reject the answer, or None to accept it."""
    if value["refund"] and value["amount_usd"] > float(inputs["order_total_usd"]):
        return f"refund {value['amount_usd']:.2f} exceeds the order total {inputs['order_total_usd']}"
    return None
