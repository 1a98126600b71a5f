"""Durations spelled the way Go prints them, which is how the Docker provider reads them back."""

from __future__ import annotations


def go_duration(seconds: float) -> str:
    """A duration as Go's time.Duration prints it (2s, 1m0s, 1m30s, 500ms), which is how the Docker provider reads
    durations back: any other spelling of the same value ("60s") shows as a diff on every `pulumi up`."""
    if seconds < 0:
        raise ValueError(f"negative duration {seconds}")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}" + (f".{rest % 1000:03d}".rstrip("0") if rest % 1000 else "")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
