"""Progress over benchmark cases: tqdm when installed, else a plain counter on stderr."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yields advance(label): call it once per finished case."""
    if not enabled:
        yield lambda label: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)

        def advance(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        try:
            yield advance
        finally:
            bar.close()
        return
    done = [0]

    def advance(label: str) -> None:
        done[0] += 1
        print(f"{desc}: {done[0]}/{total} {label}", file=sys.stderr, flush=True)

    yield advance
