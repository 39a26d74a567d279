"""The one exception type PrunePath raises for bad input; its message always says how to fix the problem."""


class PrunePathError(ValueError):
    """Bad input or an unsupported setting. The message names the fix."""


def close_matches(word: str, choices, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The known names closest to ``word`` (case-insensitive, best first; empty when none is close)."""
    import difflib

    by_lower = {}
    for c in choices:
        by_lower.setdefault(str(c).lower(), str(c))
    return [by_lower[m] for m in difflib.get_close_matches(str(word).lower(), list(by_lower), n=n, cutoff=cutoff)]


def unknown_names_message(unknown, known, what: str = "setting") -> str:
    """``unknown setting 'lr': did you mean lr_router, lr_backbone?`` for each unknown name: the closest known
    names instead of the whole list (the whole list only when there are few)."""
    known = [str(k) for k in known]
    parts, any_near = [], False
    for u in unknown:
        near = close_matches(u, known) or [k for k in known if str(u).lower() in k.lower().split("_")][:3]
        any_near = any_near or bool(near)
        alts = ", ".join(near[:-1]) + " or " + near[-1] if len(near) > 1 else "".join(near)
        parts.append(f"{u!r} (did you mean {alts}?)" if near else repr(u))
    s = "s" if len(parts) > 1 else ""
    msg = f"unknown {what}{s} {', '.join(parts)}"
    if len(known) <= 12:
        msg += f"; known: {', '.join(sorted(known))}"
    elif not any_near:
        msg += f" (none of the {len(known)} known {what}s is close)"
    return msg
