"""`romebatch log`: the journal's record, summarised and filtered for journals of thousands of edits.

`select` filters what `api.log` reads (no model needed); `render` prints it for people,
every user string literally (`report.literal`: a rich Text, so a subject like "[red]" stays as
typed, with its control and bidi characters escaped).
"""

from __future__ import annotations

STATUSES = ("applied", "rolled_back", "repaired", "warned", "rejected")
DEFAULT_LIMIT = 20  # edits shown to people when no --limit is given


def summarize(data: dict) -> dict:
    """Counts over the whole journal, whatever the filters."""
    edits = data["edits"]
    on_path = [e for e in edits if e["status"] == "applied"]
    scored = [e for e in on_path if e["p_new_after"] is not None and e["p_true_after"] is not None]
    return {
        "edits": len(edits),
        "on_path": len(on_path),
        "rolled_back": sum(e["status"] == "rolled_back" for e in edits),
        "repairs": sum(bool(e["repair"]) for e in on_path),
        "warned": sum(bool(e.get("warning")) for e in on_path),
        "rejected": len(data["rejections"]),
        # ES at the moment each edit was made (P(new) > P(true) right after it), not now: `verify` says now.
        "efficacy_when_made": 100.0 * sum(e["p_new_after"] > e["p_true_after"] for e in scored) / len(scored)
        if scored
        else None,
    }


def _matches(entry: dict, status: str | None) -> bool:
    if status is None:
        return True
    if status == "repaired":
        return bool(entry["repair"])
    if status == "warned":
        return bool(entry.get("warning"))
    return entry["status"] == status


def select(
    data: dict,
    *,
    status: str | None = None,
    fact: str | None = None,
    since: int | None = None,
    limit: int | None = None,
) -> dict:
    """`data` (from `api.log`) with its edits and rejections filtered, and a `summary` of the whole.

    status: applied (on the head's path) | rolled_back | repaired | warned | rejected;
    fact: one fact id; since: only edits after edit N (rejections computed on state N or later);
    limit: the last N matching edits and rejections (None or 0: all).
    """
    from .errors import UserError

    if status is not None and status not in STATUSES:
        raise UserError(f"--status {status!r}: choose one of {', '.join(STATUSES)}")
    if since is not None and since < 0:
        raise UserError(f"--since {since}: give an edit number (0 = the base)")
    if limit is not None and limit < 0:
        raise UserError(f"--limit {limit}: give a number of entries, or 0 for all")
    edits = (
        []
        if status == "rejected"
        else [
            e
            for e in data["edits"]
            if _matches(e, status) and (fact is None or e["fact_id"] == fact) and (since is None or e["seq"] > since)
        ]
    )
    rejections = (
        []
        if status not in (None, "rejected")
        else [
            r
            for r in data["rejections"]
            if (fact is None or r["fact_id"] == fact) and (since is None or r["parent"] >= since)
        ]
    )
    matched = {"edits": len(edits), "rejections": len(rejections)}
    if limit:
        edits, rejections = edits[-limit:], rejections[-limit:]
    return {
        **data,
        "summary": summarize(data),
        "edits": edits,
        "rejections": rejections,
        "filter": {"status": status, "fact": fact, "since": since, "limit": limit or None, "matched": matched},
    }


def render(console, data: dict) -> None:
    """Summary line, then the selected edits and rejections."""
    from rich.table import Table
    from rich.text import Text

    from .report import literal

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    s, f = data["summary"], data["filter"]
    console.print(literal(f"journal {data['journal']} · model {data['model']} · head {data['head']}"))
    console.print(
        Text(
            f"{s['edits']} edit(s): {s['on_path']} on the head's path ({s['repairs']} repairs, {s['warned']} warned), "
            f"{s['rolled_back']} rolled back; {s['rejected']} rejected; efficacy when made "
            f"{fmt(s['efficacy_when_made'], '.1f')}%"
        )
    )
    shown, matched = len(data["edits"]), f["matched"]["edits"]
    if data["edits"]:
        table = Table(
            caption=f"the last {shown} of {matched} matching edit(s); -n 0 shows all" if shown < matched else None
        )
        for column in ("seq", "parent", "status", "fact", "subject", "new", "layer", "‖ΔW‖", "P(new) after", "warning"):
            table.add_column(column)
        for e in data["edits"]:
            status = (
                e["status"] + (" (repair)" if e.get("repair") else "") + (" (head)" if e["seq"] == data["head"] else "")
            )
            table.add_row(
                str(e["seq"]),
                str(e["parent"]),
                Text(status, style="yellow" if e.get("warning") else ""),
                literal(e["fact_id"]),
                literal(e["subject"]),
                literal(e["target_new"]),
                str(e["layer"]),
                fmt(e["update_norm"], ".3g"),
                fmt(e["p_new_after"], ".3f"),
                literal(e.get("warning") or ""),
            )
        console.print(table)
    elif f["status"] != "rejected":
        console.print(
            Text("no edit matches" if any(f[k] is not None for k in ("status", "fact", "since")) else "no edits yet")
        )
    if data["rejections"]:
        total = f["matched"]["rejections"]
        console.print(
            Text(
                f"{total} rejected fact(s)"
                + (f", the last {len(data['rejections'])}:" if len(data["rejections"]) < total else ":")
            )
        )
        for row in data["rejections"]:
            console.print(literal(f"  {row['fact_id']}: {row['reason']} (computed on state {row['parent']})"))
