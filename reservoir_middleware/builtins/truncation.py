"""The built-in truncation: fit the plan into the memory budget and the model window.

Memory budget (`context_token_budget`), filled in this order while each part
fits: the newest recent messages up to `recent_share` of the budget; then the
semantic units by rank, each hit followed by the rest of its unit (its answer
or question and synapse neighbours; the engine gives them to the best
`semantic_context_size` hits only), unless that rest is long
(`long_message_tokens`, 150): then it waits until every hit that fits is in
(a 700-token answer would crowd out five relevant short turns); then older
recent messages. A part that
does not fit is skipped, not a reason to stop: a shorter one after it may fit.
So under a tight budget a lower-ranked hit's answer gives way before a better
hit. A message in both sections is injected once, in the recent one.

Model window, drop order (the design's): the lowest-ranked semantic unit, then
the oldest recent message, then the client's own oldest turns. Never dropped:
system messages and the last message. A section left empty loses its note.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio.to_thread

from reservoir_middleware.context import (
    MEMORY_CLOSE,
    MEMORY_OPEN,
    RECENT_NOTE,
    SEMANTIC_NOTE,
    ContextPlan,
    TokenBudget,
    day_lines,
    line_tokens,
    memory_day,
)
from reservoir_middleware.hookspecs import hookimpl
from reservoir_middleware.records import MessageRecord

SMALLEST_MESSAGE = 5  # tokens: with less room left, filling stops


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


def _overhead(budget: TokenBudget) -> int:
    """A block's frame: `<memory>`, `</memory>` and the blank line after it."""
    return budget.text_tokens(MEMORY_OPEN) + budget.text_tokens(MEMORY_CLOSE) + 3


class _Costs:
    """What the lines of a block cost, each record counted once."""

    def __init__(self, plan: ContextPlan, budget: TokenBudget) -> None:
        self.plan, self.budget = plan, budget
        self.lines: dict[str, int] = {}
        self.note = {
            "semantic": budget.text_tokens(SEMANTIC_NOTE) + 1,
            "recent": budget.text_tokens(RECENT_NOTE) + 1,
        }
        self.frame = _overhead(budget)

    def of(self, records: list[MessageRecord]) -> int:
        for r in records:
            if r.id not in self.lines:
                self.lines[r.id] = line_tokens(r, self.plan.instance, self.budget)
        return sum(self.lines[r.id] for r in records)

    def days(self, days: set[str]) -> int:
        """A section's date lines: one per day it shows."""
        return sum(self.budget.text_tokens(line) + 1 for line in day_lines(days))

    def more_days(self, shown: set[str], new: set[str]) -> int:
        """What `new` days add to a section that shows `shown` (the year is
        written once: a day of a new year costs its full line)."""
        return self.days(shown | new) - self.days(shown) if new else 0

    def section(self, records: list[MessageRecord], section: str) -> int:
        """A whole section: its note, its lines, a date line per day."""
        if not records:
            return 0
        return self.note[section] + self.of(records) + self.days({memory_day(r) for r in records})


def fill_budget(plan: ContextPlan, budget: TokenBudget) -> ContextPlan:
    """The parts of the plan's memory that fit `budget.context_budget`, by priority."""
    limit = budget.context_budget
    if limit is None:
        return plan
    costs = _Costs(plan, budget)
    used = costs.frame
    days: dict[str, set[str]] = {"semantic": set(), "recent": set()}

    def extra(records: list[MessageRecord], section: str, first: bool) -> int:
        new_days = {memory_day(r) for r in records} - days[section]
        note = costs.note[section] if first else 0
        return costs.of(records) + costs.more_days(days[section], new_days) + note

    recent = plan.recent
    first_recent = len(recent)  # recent[first_recent:] is kept

    def take_recent(cap: int) -> None:
        nonlocal used, first_recent
        while first_recent > 0:
            record = recent[first_recent - 1]
            more = extra([record], "recent", first_recent == len(recent))
            if used + more > cap:
                return
            used += more
            days["recent"].add(memory_day(record))
            first_recent -= 1

    # the share is the section's own: the block's frame is paid once, outside it
    take_recent(min(limit, int(limit * budget.recent_share) + costs.frame))
    present = {r.id for r in recent[first_recent:]}  # a hit among them is not repeated
    long = budget.long_message
    units = sorted(plan.semantic, key=lambda u: u.score, reverse=True)
    order: list[tuple[int, bool]] = []
    deferred: list[tuple[int, bool]] = []  # long answers: after every hit
    for i, unit in enumerate(units):
        order.append((i, True))
        rest = [r for r in unit.records if r.id != unit.hit_id]
        (deferred if long > 0 and costs.of(rest) > long else order).append((i, False))
    order += deferred
    kept: dict[int, set[str]] = {}
    for i, is_hit in order:
        if limit - used < SMALLEST_MESSAGE:
            break
        unit = units[i]
        if not is_hit and i not in kept:
            continue  # the answer of a hit that did not fit
        part = [r for r in unit.records if (r.id == unit.hit_id) == is_hit and r.id not in present]
        more = extra(part, "semantic", not kept)
        if part and used + more <= limit:
            kept.setdefault(i, set()).update(r.id for r in part)
            present.update(r.id for r in part)
            days["semantic"].update(memory_day(r) for r in part)
            used += more
    for r in recent:  # recent messages injected as semantic memory cost nothing more
        if r.id in present:
            costs.lines[r.id] = 0
    take_recent(limit)
    # a message in both sections stays in the recent one, where it belongs in time
    in_recent = {r.id for r in recent[first_recent:]}
    chosen = [
        replace(units[i], records=kept_records)
        for i in sorted(kept)
        if (kept_records := [r for r in units[i].records if r.id in kept[i] - in_recent])
    ]
    return replace(plan, semantic=chosen, recent=recent[first_recent:])


def truncate(plan: ContextPlan, budget: TokenBudget) -> ContextPlan:
    count = budget.count_message
    plan = fill_budget(plan, budget)
    plan = replace(
        plan,
        system=list(plan.system),
        semantic=sorted(plan.semantic, key=lambda u: u.score, reverse=True),
        recent=list(plan.recent),
        conversation=list(plan.conversation),
    )
    costs = _Costs(plan, budget)
    convo_cost = [count(m) for m in plan.conversation]
    fixed = sum(count(m) for m in plan.system) + 3
    dropped: set[int] = set()
    groups = _conversation_groups(plan.conversation)

    def injected() -> int:
        semantic = [r for u in plan.semantic for r in u.records]
        total = costs.section(semantic, "semantic") + costs.section(plan.recent, "recent")
        return total + costs.frame if total else 0

    def estimate() -> int:
        convo = sum(c for i, c in enumerate(convo_cost) if i not in dropped)
        return fixed + injected() + convo

    def drop_one(over_window: bool) -> bool:
        if plan.semantic:
            plan.semantic.pop()
        elif plan.recent:
            plan.recent.pop(0)
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
    # The estimate counts each line on its own; near the window, count the
    # request as it will be sent (a merged system message tokenises differently too).
    if plan.merge_system or estimate() > budget.input_limit * 0.9:
        while budget.count_messages(_render(plan, dropped)) > budget.input_limit:
            if not drop_one(True):
                break
    plan.conversation = [m for i, m in enumerate(plan.conversation) if i not in dropped]
    return plan


def _render(plan: ContextPlan, dropped: set[int]) -> list[dict[str, Any]]:
    conversation = [m for i, m in enumerate(plan.conversation) if i not in dropped]
    return replace(plan, conversation=conversation).render()
