"""The built-in truncation: fit the plan into the model window and the memory budget.

Drop order (the design's): least similar semantic unit, then the oldest recent
message, then the client's own oldest turns. Never dropped: system messages
and the last message. A section left empty loses its note.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread

from ..context import RECENT_NOTE, SEMANTIC_NOTE, ContextPlan, TokenBudget
from ..hookspecs import hookimpl


class BudgetTruncation:
    name = "truncate"

    @hookimpl(trylast=True)
    async def reservoir_truncate(self, plan: ContextPlan, budget: TokenBudget) -> ContextPlan:
        return await anyio.to_thread.run_sync(truncate, plan, budget)


def _conversation_groups(conversation: list[dict[str, Any]]) -> list[list[int]]:
    """Indexes of droppable turns, oldest first; tool results stay with their call."""
    groups: list[list[int]] = []
    for index, message in enumerate(conversation[:-1]):
        role = message.get("role")
        if role in ("system", "developer"):
            continue
        if role == "tool" and groups and _is_tool_group(conversation, groups[-1]):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _is_tool_group(conversation: list[dict[str, Any]], group: list[int]) -> bool:
    first = conversation[group[0]]
    return first.get("role") == "assistant" and bool(first.get("tool_calls"))


def truncate(plan: ContextPlan, budget: TokenBudget) -> ContextPlan:
    count = budget.count_message
    plan = ContextPlan(
        system=list(plan.system),
        semantic=sorted(plan.semantic, key=lambda u: u.score, reverse=True),
        recent=list(plan.recent),
        conversation=list(plan.conversation),
        merge_system=plan.merge_system,
    )
    unit_cost = [sum(count(r.to_message()) for r in u.records) for u in plan.semantic]
    recent_cost = [count(r.to_message()) for r in plan.recent]
    convo_cost = [count(m) for m in plan.conversation]
    fixed = sum(count(m) for m in plan.system) + 3
    sem_note = count({"role": "system", "content": SEMANTIC_NOTE})
    rec_note = count({"role": "system", "content": RECENT_NOTE})
    dropped: set[int] = set()
    groups = _conversation_groups(plan.conversation)

    def injected() -> int:
        total = sum(unit_cost) + sum(recent_cost)
        return total + (sem_note if unit_cost else 0) + (rec_note if recent_cost else 0)

    def estimate() -> int:
        convo = sum(c for i, c in enumerate(convo_cost) if i not in dropped)
        return fixed + injected() + convo

    def drop_one(over_window: bool) -> bool:
        if plan.semantic:
            plan.semantic.pop()
            unit_cost.pop()
        elif plan.recent:
            plan.recent.pop(0)
            recent_cost.pop(0)
        elif over_window and groups:
            dropped.update(groups.pop(0))
        else:
            return False
        return True

    limit = budget.context_budget

    def over_budget() -> bool:
        return limit is not None and injected() > limit

    while over_budget() or estimate() > budget.input_limit:
        if not drop_one(estimate() > budget.input_limit):
            break
    # The estimate is exact for separate messages; a merged system message
    # tokenises slightly differently, so check the rendered request too.
    while plan.merge_system and budget.count_messages(_render(plan, dropped)) > budget.input_limit:
        if not drop_one(True):
            break
    plan.conversation = [m for i, m in enumerate(plan.conversation) if i not in dropped]
    return plan


def _render(plan: ContextPlan, dropped: set[int]) -> list[dict[str, Any]]:
    trial = ContextPlan(
        system=plan.system,
        semantic=plan.semantic,
        recent=plan.recent,
        conversation=[m for i, m in enumerate(plan.conversation) if i not in dropped],
        merge_system=plan.merge_system,
    )
    return trial.render()
